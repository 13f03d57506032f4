"""Per-rank heartbeats: what every rank is doing, in one small JSON file per rank under the run folder.

One definition for both sides. A rank's writer (`start`) keeps the rank's state in memory; the calls the
training code makes (`report_phase`, `report_progress`, `report_step`) only update that state, and a
background thread writes the file (atomic replace) when it changed, at most `interval_s` apart, plus a
pulse every `pulse_s` while nothing changes. So a heartbeat costs the training loop a dict update (a
phase change, rare, is written at once), and the file tells two things apart: progress (the `progress`
counter moves) and life (the `writes` counter moves; it stops only when the whole process is frozen or gone).

The launcher of each node reads its own ranks' files, node 0's launcher reads every rank's (multi-node
runs need a shared output_dir), and `tune-launch status` reads them from any shell. Readers judge age by
when a counter last moved on their own clock, never by comparing clocks across machines.

    from tune_launch.heartbeat import report_progress
    report_progress("data", done=rows_tokenized, total=rows, detail="tokenizing train")

Every call is a no-op when no writer was started (tests, a script run by hand), and a heartbeat that
cannot be written never stops training.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
FOLDER = "heartbeat"  # under output_dir
STALL_FILE = "stall.json"  # node 0's announcement of a stall, read by the other nodes' launchers
ATTEMPT_ENV = "TUNE_LAUNCH_ATTEMPT"  # set by each node's launcher: marks this launch's files as its own
STACK_SIGNAL_NAME = "SIGUSR2"  # the signal on which a rank writes every thread's Python stack (faulthandler)
PHASES = ("starting", "data", "model_load", "train", "eval", "save", "consolidate", "done", "stopped", "failed")
FINAL_PHASES = ("done", "stopped", "failed")
LAG_S = 2.0  # a change not written by the thread after this long is written by the reporting thread itself


def write_interval_s(world_size: int) -> float:
    """Twice a second, less often in large jobs: the shared filesystem sees at most ~500 writes a second."""
    return max(0.5, world_size / 500)


def folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FOLDER


def rank_file(run_dir: str | os.PathLike, rank: int) -> Path:
    return folder(run_dir) / f"rank{rank}.json"


def node_stacks_file(run_dir: str | os.PathLike, node: int) -> Path:
    """Where a node's launcher leaves the summary of its ranks' stacks for node 0's verdict."""
    return folder(run_dir) / f"stacks-node{node}.json"


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Heartbeat:
    """One rank's last heartbeat as read from its file; unknown or missing keys fall back to the defaults."""

    rank: int = -1
    node: int = 0
    local_rank: int = 0
    world_size: int = 1
    pid: int = 0
    host: str = ""
    attempt: str = ""
    started: float = 0.0  # wall clock of the rank's start
    main_thread: int = 0  # threading.main_thread().ident: finds the main thread in a stack dump
    stack_file: str = ""  # where the rank's faulthandler writes on STACK_SIGNAL_NAME ("" if not registered)
    log_file: str = ""
    phase: str = "starting"
    detail: str = ""
    phase_time: float = 0.0  # wall clock when the phase began
    step: int = 0  # optimizer steps done
    max_steps: int = 0
    done: int = 0  # progress within the phase (batches, rows, ...)
    total: int = 0
    progress: int = 0  # moves on every report: the stall detector's signal
    progress_time: float = 0.0
    writes: int = 0  # moves on every write, pulses included: the process is alive
    time: float = 0.0  # wall clock of this write
    step_s: float = 0.0  # median duration of the recent optimizer steps
    steps_timed: int = 0
    loss: float | None = None
    loss_step: int = 0
    eval_loss: float | None = None
    tokens_per_s: float = 0.0
    error: str = ""
    version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Heartbeat:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            f = known.get(key)
            if f is None:
                continue
            default = f.default
            if value is None or default is None or isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)):
                values[key] = value
        return cls(**values)

    @property
    def signature(self) -> tuple[str, int, int]:
        """Changes with every write: a file whose signature never changes belongs to no live rank."""
        return (self.attempt, self.pid, self.writes)

    @property
    def where(self) -> str:
        """'train step 37/400', 'data 1200/5000', 'save checkpoint-36'."""
        if self.phase == "train":
            return f"train step {self.step + 1}" + (f"/{self.max_steps}" if self.max_steps else "")
        text = self.phase.replace("_", " ")
        if self.total:
            text += f" {self.done}/{self.total}"
        elif self.done:
            text += f" {self.done}"
        text = f"{text} {self.detail}".strip()
        if self.phase in FINAL_PHASES and self.step:
            return f"{text} at step {self.step}" + (f"/{self.max_steps}" if self.max_steps else "")
        return text + (f" after step {self.step}" if self.step and self.phase == "eval" else "")


def read(path: str | os.PathLike) -> Heartbeat | None:
    """The heartbeat in one file; None when it is missing or not (yet) a complete record."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Heartbeat.from_dict(data) if isinstance(data, dict) else None


def read_run(run_dir: str | os.PathLike, ranks: range | None = None) -> dict[int, Heartbeat]:
    """Every rank's heartbeat in a run folder (or only `ranks`), by global rank."""
    if ranks is not None:
        found = {r: read(rank_file(run_dir, r)) for r in ranks}
    else:
        try:
            names = [p for p in folder(run_dir).iterdir() if p.name.startswith("rank") and p.suffix == ".json"]
        except OSError:
            return {}
        found = {}
        for p in names:
            beat = read(p)
            if beat is not None:
                found[beat.rank] = beat
    return {r: b for r, b in found.items() if b is not None}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic replace (no fsync: a heartbeat need not survive a crash of the machine, only be whole)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the rank's writer


class HeartbeatWriter:
    """The state of one rank, written by a daemon thread when it changed (and as a pulse when it did not)."""

    def __init__(self, path: Path, identity: dict[str, Any], interval_s: float = 0.5, pulse_s: float = 5.0,
                 clock=time.time) -> None:
        self.path, self.interval_s, self.pulse_s, self.clock = Path(path), interval_s, pulse_s, clock
        now = clock()
        self.state: dict[str, Any] = {"version": FORMAT_VERSION, **identity, "phase": "starting", "phase_time": now,
                                      "progress": 0, "progress_time": now, "writes": 0}
        self._lock = threading.RLock()  # re-entrant: a report from a signal handler on the main thread is safe
        self._io = threading.RLock()  # one write at a time (the thread's and a final one from the main thread)
        self._dirty = True
        self._last_write = 0.0
        self.lag_s = max(LAG_S, 4 * interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HeartbeatWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        self.flush()
        self._thread = threading.Thread(target=self._run, name="tune-launch-heartbeat", daemon=True)
        self._thread.start()
        return self

    def update(self, progress: bool = True, **values: Any) -> None:
        """Change the state; the thread writes it. A new phase is written at once (the limits depend on it),
        and so is any change the thread has not written for `LAG_S` (a thread starved of the GIL or the CPU)."""
        with self._lock:
            new_phase = values.get("phase") not in (None, self.state.get("phase"))
            if new_phase:
                self.state["phase_time"] = self.clock()
                self.state.update(done=0, total=0, detail="")
            self.state.update(values)
            if progress:
                self.state["progress"] += 1
                self.state["progress_time"] = self.clock()
            self._dirty = True
        if new_phase or time.monotonic() - self._last_write > self.lag_s:
            self.flush()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self.state.get(key, default)

    def flush(self) -> None:
        """Write now (also from the main thread, e.g. the last record before the process exits)."""
        with self._io:
            with self._lock:
                self.state["writes"] += 1
                self.state["time"] = self.clock()
                snapshot = dict(self.state)
                self._dirty = False
                self._last_write = time.monotonic()
            try:
                write_json(self.path, snapshot)
            except OSError:
                pass  # a full or vanished disk shows up in the checkpoint, not here

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self._dirty or time.monotonic() - self._last_write >= self.pulse_s:
                    self.flush()
            except Exception:  # noqa: BLE001 - the heartbeat must never end the rank
                pass

    def close(self, **values: Any) -> None:
        """The last record (a final phase), written synchronously; the thread stops."""
        if values:
            self.update(**values)
        self._stop.set()
        self.flush()


_writer: HeartbeatWriter | None = None


def start(path: Path, identity: dict[str, Any], **kwargs: Any) -> HeartbeatWriter:
    """Start this process's heartbeat (once; a second call returns the running writer)."""
    global _writer
    if _writer is None:
        _writer = HeartbeatWriter(path, identity, **kwargs).start()
    return _writer


def current() -> HeartbeatWriter | None:
    return _writer


def report_phase(phase: str, detail: str = "", **values: Any) -> None:
    """This rank entered `phase` (one of PHASES): starting, data, model_load, train, eval, save, consolidate."""
    if _writer is not None:
        _writer.update(phase=phase, detail=detail, **values)


def report_progress(phase: str, done: int, total: int | None = None, detail: str | None = None) -> None:
    """Progress inside a long phase (rows tokenized, batches evaluated, bytes written): while it keeps
    moving, the phase may last as long as it needs without a stall alarm."""
    if _writer is not None:
        values: dict[str, Any] = {"phase": phase, "done": int(done)}
        if total is not None:
            values["total"] = int(total)
        if detail is not None:
            values["detail"] = detail
        _writer.update(**values)


def report_busy() -> None:
    """Progress without a counter: work inside a library call that reports nothing (see
    `training/prepare_progress.BusyProgress`); the phase's figures are left as they are."""
    if _writer is not None:
        _writer.update()


def report_step(step: int, max_steps: int, **values: Any) -> None:
    """An optimizer step finished (values: loss, tokens_per_s, step_s, steps_timed)."""
    if _writer is not None:
        _writer.update(phase="train", step=int(step), max_steps=int(max_steps), **values)


def flush() -> None:
    """Write the current state now (before an action that may freeze the process, such as a test's SIGSTOP)."""
    if _writer is not None:
        _writer.flush()


def report_metrics(**values: Any) -> None:
    """Figures that are not progress by themselves (loss, eval loss): shown by `tune-launch status`."""
    if _writer is not None:
        _writer.update(progress=False, **values)


def finish(phase: str, **values: Any) -> None:
    """The rank's last word (done, stopped, failed), written before it exits."""
    if _writer is not None:
        _writer.close(phase=phase, **values)
