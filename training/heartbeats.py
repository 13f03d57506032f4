"""A rank's side of hang detection: its heartbeat (phase and progress, format in `tune_launch/heartbeat.py`),
every thread's Python stack on SIGUSR2, and the one-line report of a crash.

The launcher reads the heartbeats to find a job that stopped making progress; then it sends SIGUSR2 to every
rank and faulthandler writes all threads' stacks into output_dir/heartbeat/rank<R>.stacks.txt, from the
signal handler itself, so even a main thread blocked inside a C++ collective answers; the launcher puts
them into its stall report in output_dir/logs/. The Trainer hooks that
report steps, evaluation and saves are in `training/heartbeat_callback.py` (they need transformers; this
module does not, so the heartbeat starts before the heavy imports).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tune_launch import heartbeat
from tune_launch.protocol import failure_line
from tune_launch.training.distributed import RankInfo

STACK_SIGNAL = getattr(signal, heartbeat.STACK_SIGNAL_NAME)
_stack_file: Any = None  # kept open for the life of the process: faulthandler writes into its descriptor


def stack_file_path(output_dir: str | os.PathLike, rank: int) -> Path:
    """Beside the heartbeat: the launcher copies what lands here into the stall report in output_dir/logs/."""
    return heartbeat.folder(output_dir) / f"rank{rank}.stacks.txt"


def register_stack_dump(path: Path) -> str:
    """On SIGUSR2 faulthandler appends every thread's stack to `path`; '' when the file cannot be opened."""
    global _stack_file
    if _stack_file is not None:
        return _stack_file.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - must stay open
    except OSError:
        return ""
    faulthandler.register(STACK_SIGNAL, file=fh, all_threads=True, chain=False)
    _stack_file = fh
    return str(path)


def start_rank_heartbeat(output_dir: str | os.PathLike, info: RankInfo, env: Mapping[str, str] | None = None) -> None:
    """Start this rank's heartbeat in output_dir/heartbeat/rank<R>.json (phase 'starting') and the stack dump."""
    env = os.environ if env is None else env
    out = Path(output_dir)
    stack_file = register_stack_dump(stack_file_path(out, info.rank))
    heartbeat.start(heartbeat.rank_file(out, info.rank), {
        "rank": info.rank, "node": info.node_rank, "local_rank": info.local_rank, "world_size": info.world_size,
        "pid": os.getpid(), "host": socket.gethostname(), "attempt": env.get(heartbeat.ATTEMPT_ENV, ""),
        "started": time.time(), "main_thread": threading.main_thread().ident or 0, "stack_file": stack_file,
        "log_file": str(out / "logs" / f"node{info.node_rank}.log"),
    }, interval_s=heartbeat.write_interval_s(info.world_size))


def phase(name: str, detail: str = "") -> None:
    """This rank entered a phase of the run (data, model_load, ...): one call where the phase begins."""
    heartbeat.report_phase(name, detail)
    from tune_launch.training.faults import at_phase

    at_phase(name)


def report_crash(rank: int, exc: BaseException, refused: bool = False) -> None:
    """A failed rank: the traceback into this node's log file, one line on stderr naming the rank, the node,
    the error and that file, and 'failed' as the last heartbeat (`tune-launch status` shows it)."""
    from tune_launch.training.logs import log_traceback

    writer = heartbeat.current()
    node = writer.get("node") if writer is not None else RankInfo.from_environ().node_rank
    where = None if refused else log_traceback(exc, f"rank {rank} failed: {type(exc).__name__}: {exc}")
    print(failure_line(rank, exc, refused=refused, node=node, log=where), file=sys.stderr, flush=True)
    heartbeat.finish("failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
