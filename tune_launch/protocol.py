"""What the launcher and the ranks agree on, in one place: the failure line a rank prints and the launcher
parses, and the stop grace period both sides read from the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

GRACE_ENV = "TUNE_LAUNCH_GRACE_S"  # seconds a rank has, after a stop signal, to checkpoint and exit
DEFAULT_GRACE_S = 120.0
LAUNCHER_GRACE_MARGIN_S = 15.0  # the launcher waits this much longer than the ranks before it kills them

_FAILURE = re.compile(r"\[tune-launch\] rank (\d+) (failed|refused): (.*)$")


def grace_seconds(env: Mapping[str, str] | None = None) -> float:
    """The stop grace period from TUNE_LAUNCH_GRACE_S; the default for unset or unreadable values."""
    raw = (os.environ if env is None else env).get(GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S
    return value if value >= 0 else DEFAULT_GRACE_S


def failure_line(rank: int, exc: BaseException, refused: bool = False) -> str:
    """The one line a failing rank prints on stderr. `refused`: the rank turned down bad input (a config, a
    checkpoint) rather than crashing; the launcher then exits 2, as for any bad input, and keeps the
    launcher's own traceback about that exit off the console."""
    text = " ".join(str(exc).split()) or "(no message)"
    verb = "refused" if refused else "failed"
    return f"[tune-launch] rank {rank} {verb}: {type(exc).__name__}: {text[:300]}"


@dataclass(frozen=True)
class RankFailure:
    """A parsed failure line: which rank, whether it refused bad input, and its `Type: message`."""

    rank: int
    refused: bool
    detail: str


def parse_failure_line(line: str) -> RankFailure | None:
    m = _FAILURE.search(line)
    if m is None:
        return None
    return RankFailure(int(m.group(1)), m.group(2) == "refused", m.group(3).strip())
