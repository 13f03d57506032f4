"""What the launcher and the ranks agree on, in one place: the failure line a rank prints and the launcher
parses, the stop grace period both sides read from the environment, and the launcher's exit status for a
stalled job. (The heartbeat format is in `tune_launch/heartbeat.py`.)"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

GRACE_ENV = "TUNE_LAUNCH_GRACE_S"  # seconds a rank has, after a stop signal, to checkpoint and exit
DEFAULT_GRACE_S = 120.0
LAUNCHER_GRACE_MARGIN_S = 15.0  # the launcher waits this much longer than the ranks before it kills them
EXIT_STALLED = 124  # the launcher's status when it ended a job that stopped making progress (as timeout(1))

_FAILURE = re.compile(r"\[tune-launch\] rank (\d+)(?: \(node (\d+)\))? (failed|refused): (.*)$")
_TRACEBACK_AT = "; traceback in "


def grace_seconds(env: Mapping[str, str] | None = None) -> float:
    """The stop grace period from TUNE_LAUNCH_GRACE_S; the default for unset or unreadable values."""
    raw = (os.environ if env is None else env).get(GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S
    return value if value >= 0 else DEFAULT_GRACE_S


def failure_line(rank: int, exc: BaseException, refused: bool = False, node: int | None = None,
                 log: str | None = None) -> str:
    """The one line a failing rank prints on stderr. `refused`: the rank turned down bad input (a config, a
    checkpoint) rather than crashing; the launcher then exits 2, as for any bad input, and keeps the
    launcher's own traceback about that exit off the console. `log`: the file that holds the traceback."""
    text = " ".join(str(exc).split()) or "(no message)"
    verb = "refused" if refused else "failed"
    where = f" (node {node})" if node is not None else ""
    tail = f"{_TRACEBACK_AT}{log}" if log else ""
    return f"[tune-launch] rank {rank}{where} {verb}: {type(exc).__name__}: {text[:300]}{tail}"


@dataclass(frozen=True)
class RankFailure:
    """A parsed failure line: which rank, whether it refused bad input, and its `Type: message`."""

    rank: int
    refused: bool
    detail: str
    node: int | None = None
    log: str | None = None


def parse_failure_line(line: str) -> RankFailure | None:
    m = _FAILURE.search(line.rstrip("\n"))
    if m is None:
        return None
    body = m.group(4).strip()
    detail, sep, log = body.rpartition(_TRACEBACK_AT)
    if not sep:
        detail, log = body, ""
    node = int(m.group(2)) if m.group(2) is not None else None
    return RankFailure(int(m.group(1)), m.group(3) == "refused", detail.strip(), node, log.strip() or None)
