"""Every local rank's Python stack when a job stalls: faulthandler in the rank (it answers SIGUSR2 even while
its main thread is blocked in C++), py-spy from outside when installed (it also reads a stopped process),
and the process state from /proc (stopped, in uninterruptible I/O...).

Parsing is pure (`parse_faulthandler`, `parse_py_spy_json`, `summarize`), tested with strings; `capture`
is the side effect, bounded in time: a rank that cannot answer costs a few seconds, never the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tune_launch.heartbeat import STACK_SIGNAL_NAME

STACK_SIGNAL = getattr(signal, STACK_SIGNAL_NAME)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent) + os.sep
FAULTHANDLER_WAIT_S = 3.0
PY_SPY_TIMEOUT_S = 10.0
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+) \(most recent call first\):")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
PROC_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O (disk, network filesystem or driver)",
               "T": "stopped (SIGSTOP)", "t": "stopped by a debugger", "Z": "exited (zombie)", "X": "exited", "I": "idle"}
WAITING_FILES = ("torch/distributed/", "deepspeed/comm/", "torch/autograd/graph.py", "torch/cuda/streams.py",
                 "torch/cuda/__init__.py")  # a collective, or backward waiting on the gradient all-reduce hooks
WRAPPER_FILES = ("torch/distributed/c10d_logger.py", "torch/nn/modules/module.py", "torch/utils/_contextlib.py")
WAITING_FUNCS = re.compile(r"^(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|barrier|monitored_barrier|"
                           r"wait|synchronize|_engine_run_backward|recv|send|all_to_all\w*)$")
# DDP's own collectives before a forward (buffer and parameter broadcasts); py-spy names them Class.method
DDP_FILE = "torch/nn/parallel/distributed.py"
DDP_WAITING_FUNCS = frozenset({"_distributed_broadcast_coalesced", "_default_broadcast_coalesced", "_sync_buffers",
                               "_sync_module_buffers", "_sync_params_and_buffers"})


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    @property
    def short(self) -> str:
        return f"{self.func} ({short_path(self.file)}:{self.line})"


@dataclass(frozen=True)
class ThreadStack:
    ident: int
    name: str
    frames: tuple[Frame, ...]  # innermost first
    current: bool = False


@dataclass(frozen=True)
class StackTarget:
    """A local rank to ask: its pid, its main thread's id and the file its faulthandler writes into."""

    rank: int
    pid: int
    main_thread: int = 0
    stack_file: str = ""


@dataclass(frozen=True)
class RankStack:
    """What was learnt about one rank: process state, its main thread's frames, the dumps as text."""

    rank: int
    pid: int
    state: str  # a PROC_STATES value, or "gone"
    main: tuple[Frame, ...] = ()
    sources: tuple[str, ...] = ()  # "faulthandler", "py-spy"
    text: str = ""  # the dump, for the stall report
    note: str = ""
    stack_file: str = ""  # the rank's own faulthandler file

    @property
    def stopped(self) -> bool:
        return self.state.startswith("stopped") or self.state in ("gone", "exited", "exited (zombie)")

    @property
    def waiting(self) -> bool | None:
        """In a collective (or backward on its hooks); None when the stack is unknown."""
        if not self.main:
            return None
        return any(any(w in f.file for w in WAITING_FILES) or WAITING_FUNCS.match(f.func)
                   or (DDP_FILE in f.file and f.func.rsplit(".", 1)[-1] in DDP_WAITING_FUNCS) for f in self.main[:8])

    def where(self, depth: int = 2) -> str:
        """'waits in all_reduce (torch/distributed/distributed_c10d.py:2950) <- ...': the innermost frames."""
        shown = [f for f in self.main if not any(n in f.file for n in WRAPPER_FILES)] or list(self.main)
        frames = " <- ".join(f.short for f in shown[:depth])
        if self.stopped:
            return f"process {self.state}" + (f", at {frames}" if frames else "")
        if not self.main:
            return f"process {self.state}; no Python stack ({self.note or 'not captured'})"
        return f"{'waits in' if self.waiting else 'in'} {frames}"


def short_path(path: str) -> str:
    """A frame's file as a reader knows it: 'torch/autograd/graph.py', 'tune_launch/training/faults.py'."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith(PROJECT_ROOT):  # an editable install: the checkout's folders are tune_launch's packages
        rel = path[len(PROJECT_ROOT):]
        return rel if rel.startswith("tune_launch/") else f"tune_launch/{rel}"
    m = re.search(r"/lib/python3\.\d+/(.*)$", path)
    if m:
        return m.group(1)
    parts = Path(path).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else path


# --------------------------------------------------------------------------- parsing (pure)

def parse_faulthandler(text: str) -> list[ThreadStack]:
    """faulthandler's dump (`Thread 0x... (most recent call first):` blocks) as threads, innermost frame first."""
    threads: list[ThreadStack] = []
    ident, current, frames = None, False, []
    for line in text.splitlines():
        m = _THREAD.match(line)
        if m:
            if ident is not None:
                threads.append(ThreadStack(ident, "", tuple(frames), current))
            ident, current, frames = int(m.group(2), 16), m.group(1) == "Current thread", []
            continue
        m = _FRAME.match(line)
        if m and ident is not None:
            frames.append(Frame(m.group(1), int(m.group(2)), m.group(3)))
    if ident is not None:
        threads.append(ThreadStack(ident, "", tuple(frames), current))
    return threads


def parse_py_spy_json(text: str) -> list[ThreadStack]:
    """`py-spy dump --json` as threads, innermost frame first."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    threads = []
    for t in data if isinstance(data, list) else []:
        frames = tuple(Frame(f.get("filename") or f.get("short_filename") or "?", int(f.get("line") or 0), f.get("name") or "?")
                       for f in t.get("frames") or [])
        threads.append(ThreadStack(int(t.get("thread_id") or 0), t.get("thread_name") or "", frames))
    return threads


def main_thread(threads: list[ThreadStack], ident: int) -> ThreadStack | None:
    """The main thread: by the id the rank's heartbeat gave, else by name, else the thread the signal ran on."""
    for t in threads:
        if ident and t.ident == ident:
            return t
    for t in threads:
        if t.name == "MainThread":
            return t
    return next((t for t in threads if t.current), None)


def render(threads: list[ThreadStack], ident: int) -> str:
    """Every thread, the main one first, innermost frame first."""
    main = main_thread(threads, ident)
    out = []
    for t in sorted(threads, key=lambda t: t is not main):
        label = "main thread" if t is main else (t.name or "thread")
        out.append(f"  {label} 0x{t.ident:x}:")
        out += [f"    {f.func} ({f.file}:{f.line})" for f in t.frames] or ["    (no Python frames)"]
    return "\n".join(out)


def summarize(target: StackTarget, state: str, faulthandler_text: str, py_spy_text: str, note: str = "") -> RankStack:
    """One rank's stacks from what each tool returned (either may be empty)."""
    sources, text, main = [], "", ()
    # py-spy names threads and classes; faulthandler's dump stays in the rank's own stacks file
    for name, threads in (("py-spy", parse_py_spy_json(py_spy_text)), ("faulthandler", parse_faulthandler(faulthandler_text))):
        if not threads:
            continue
        sources.append(name)
        t = main_thread(threads, target.main_thread)
        if not main and t is not None and t.frames:
            main, text = t.frames, f" ({name})\n{render(threads, target.main_thread)}"
    return RankStack(target.rank, target.pid, state, tuple(main), tuple(sources), text, note, target.stack_file)


# --------------------------------------------------------------------------- capture (side effects)

def process_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    letter = stat.rsplit(")", 1)[-1].split()[0]
    return PROC_STATES.get(letter, letter)


def catches(pid: int, signum: int) -> bool:
    """The process installed a handler for `signum` (SigCgt in /proc): sending it will not kill it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _py_spy(binary: str, pid: int, stopped: bool) -> tuple[str, str]:
    """(json, note). A stopped process is read without pausing it (py-spy cannot suspend it again)."""
    modes = [["--nonblocking"]] if stopped else [[], ["--nonblocking"]]
    note = ""
    for extra in modes:
        try:
            done = subprocess.run([binary, "dump", "--json", "--pid", str(pid), *extra], capture_output=True, text=True,
                                  timeout=PY_SPY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            note = f"py-spy did not answer in {PY_SPY_TIMEOUT_S:.0f} s"
            continue
        if done.returncode == 0:
            return done.stdout, ""
        note = "py-spy: " + " ".join((done.stderr or "").split())[:160]
    return "", note


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def capture(targets: Mapping[int, StackTarget], use_py_spy: bool = True) -> dict[int, RankStack]:
    """Ask every target for its stacks at once (faulthandler signal, py-spy), bounded by a few seconds."""
    states = {r: process_state(t.pid) for r, t in targets.items()}
    asked: dict[int, int] = {}
    for r, t in targets.items():
        if t.stack_file and not states[r].startswith(("stopped", "gone", "exited")) and catches(t.pid, STACK_SIGNAL):
            asked[r] = _file_size(t.stack_file)
            try:
                os.kill(t.pid, STACK_SIGNAL)
            except (ProcessLookupError, PermissionError):
                asked.pop(r)
    binary = py_spy_binary() if use_py_spy else None
    spied: dict[int, tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(targets)))) as pool:
        futures = {r: pool.submit(_py_spy, binary, t.pid, states[r].startswith("stopped"))
                   for r, t in targets.items() if binary and not states[r].startswith(("gone", "exited"))}
        dumps = _wait_for_dumps({r: targets[r].stack_file for r in asked}, asked)
        for r, f in futures.items():
            spied[r] = f.result()
    out = {}
    for r, t in targets.items():
        note = spied.get(r, ("", ""))[1]
        if not binary and r not in asked:
            note = note or "py-spy is not installed (pip install py-spy) and the process cannot run its handler"
        out[r] = summarize(t, states[r], dumps.get(r, ""), spied.get(r, ("", ""))[0], note)
    return out


def _wait_for_dumps(files: Mapping[int, str], offsets: Mapping[int, int]) -> dict[int, str]:
    """What each faulthandler appended after `offsets`, once its file stopped growing (or the wait is over)."""
    deadline = time.monotonic() + FAULTHANDLER_WAIT_S
    sizes = {r: -1 for r in files}
    settled: set[int] = set()
    while len(settled) < len(files) and time.monotonic() < deadline:
        time.sleep(0.1)
        for r, path in files.items():
            size = _file_size(path)
            if size > offsets[r] and size == sizes[r]:
                settled.add(r)
            sizes[r] = size
    return {r: _read_from(path, offsets[r]) for r, path in files.items()}
