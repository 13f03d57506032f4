"""What the launcher concludes about a launch, as pure functions of what it saw. No processes, no clocks.

Three pieces, each fed by the thin process loop in `launch/run.py` and testable with lists of strings:
- `RankOutput.feed(line, now)`: the launch's stderr, line by line. It notes a rank's own failure line
  (`tune_launch.protocol`), torchrun's one-line failure record and its "Root Cause (first observed failure)"
  block, and decides whether the line is shown now or held back: after a rank said in one line why it
  failed or refused, the launcher's traceback about that exit is noise, shown only if the verdict is
  something else (the loop keeps it in the node's launch log).
- `Watch.tick(now, alive, beats, stopped)`: what to do next: pass a stop signal on to the ranks, kill the
  survivors of a dead rank after `fail_fast_s`, give up after the grace period or a second stop signal, and,
  from the ranks' heartbeats (`launch/stall.py`), capture every stack and end a job that stopped making
  progress; a stop signal while a rank is stopped (SIGSTOP) ends the job at once: that rank cannot save.
- `verdict(output, watch, code, node_rank, now, stall_lines)`: the exit code and the lines that end the launch.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from tune_launch.launch.stall import Stall, StallTracker
from tune_launch.protocol import EXIT_STALLED, LAUNCHER_GRACE_MARGIN_S, parse_failure_line

FAIL_FAST_S = 5.0  # a dead rank's peers get this long to exit on their own before SIGKILL
HARD_DEADLINE_S = 10.0  # after the survivors were killed: then everything in the launch's session goes
SUSPENDED_GAP_S = 10.0  # a gap this long between two ticks: the launcher itself was stopped (a suspended job)
TORCHRUN_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
ROOT_CAUSE = "Root Cause (first observed failure)"
PEER_LOST = re.compile(r"Connection (reset|closed) by peer|remote worker|Broken pipe|communicator was aborted|"
                       r"NCCL (error|communicator)|DistBackendError|[Tt]imed? ?out|Socket Timeout", re.I)
TAGGED_LINE = re.compile(r"^(\S+ )?\[(node\d+ rank\d+|tune-launch)[\] ]")  # rank log lines and our own


def exit_detail(code: int) -> str:
    """A process exit status in words: 'exit code 3', 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class Failure:
    """The rank that failed first: global rank, how, and when the launcher learnt of it."""

    rank: int
    detail: str
    exitcode: int | None
    at: float
    refused: bool = False


# --------------------------------------------------------------------------- the ranks' output

@dataclass
class RankOutput:
    """Everything the launch's stderr told about the ranks of this node."""

    node_rank: int = 0
    processes_per_node: int = 1
    messages: dict[int, str] = field(default_factory=dict)  # rank -> its own one-line error, first one kept
    refusals: set[int] = field(default_factory=set)  # ranks whose line was a refusal of bad input
    log_files: dict[int, str] = field(default_factory=dict)  # rank -> the log file holding its traceback
    exitcodes: dict[int, int] = field(default_factory=dict)  # rank -> exit code, from torchrun's report
    root_rank: int | None = None  # torchrun's "first observed failure"
    first_evidence: float | None = None
    held: list[str] = field(default_factory=list)
    _block_rank: int | None = None
    _in_root: bool = False

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.processes_per_node + local_rank

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    def feed(self, line: str, now: float) -> bool:
        """Take one line of the launch's stderr; True when it is to be shown now, False when held back."""
        show = not (self.messages and not TAGGED_LINE.match(line))
        if not show:
            self.held.append(line)
        failure = parse_failure_line(line)
        if failure is not None:
            self.messages.setdefault(failure.rank, failure.detail)
            if failure.log:
                self.log_files.setdefault(failure.rank, failure.log)
            if failure.refused:
                self.refusals.add(failure.rank)
            self.first_evidence = self.first_evidence or now
        m = TORCHRUN_FAILED.search(line)
        if m:
            rank = self.global_rank(int(m.group(2)))
            self.exitcodes.setdefault(rank, int(m.group(1)))
            self.root_rank = rank if self.root_rank is None else self.root_rank
            self.first_evidence = self.first_evidence or now
        if ROOT_CAUSE in line:
            self._in_root = True
        m = SUMMARY_RANK.search(line)
        if m:
            self._block_rank = self.global_rank(int(m.group(2)))
        m = SUMMARY_EXIT.search(line)
        if m and self._block_rank is not None:
            self.exitcodes[self._block_rank] = int(m.group(1))
            if self._in_root and self.root_rank is None:
                self.root_rank = self._block_rank
            self._block_rank = None
        return show

    def take_held(self) -> list[str]:
        held, self.held = self.held, []
        return held

    def culprit(self, gone: dict[int, float], killed: set[int], now: float) -> Failure | None:
        """The rank that failed first: its own error, not a peer's 'connection reset' that followed it."""
        secondary = {r for r, msg in self.messages.items() if PEER_LOST.search(msg)}
        primaries = [r for r in self.messages if r not in secondary]
        if not primaries:
            silent = [r for r, c in self.exitcodes.items() if c != 0 and r not in secondary and r not in killed]
            primaries = sorted(silent, key=lambda r: (r != self.root_rank, r))
        if not primaries and gone:
            primaries = [min(gone, key=gone.get)]
        if not primaries:
            primaries = [r for r in (self.root_rank, *self.messages) if r is not None][:1]
        if not primaries:
            return None
        r = primaries[0]
        code = self.exitcodes.get(r)
        detail = self.messages.get(r) or (exit_detail(code) if code is not None else "exited while the other ranks were running")
        return Failure(r, detail, code, self.first_evidence or now, refused=r in self.refusals)


# --------------------------------------------------------------------------- what to do next

@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class SignalRanks:
    signum: int
    ranks: tuple[int, ...]  # global ranks


@dataclass(frozen=True)
class KillEverything:
    """SIGKILL every rank and the launch's whole session; the loop ends."""

    reason: str


@dataclass(frozen=True)
class CaptureStacks:
    """Ask every rank of this node for its stacks (before they are killed); `announced`: node 0 found the stall."""

    stall: Stall | None
    announced: bool = False


Action = Say | SignalRanks | KillEverything | CaptureStacks


@dataclass
class Watch:
    """The supervisor's decisions over time, from the ranks it can see alive and the stop signals it got."""

    grace_s: float
    fail_fast_s: float = FAIL_FAST_S
    stop_signal: int | None = None
    stop_count: int = 0
    stop_sent_at: float | None = None
    gone: dict[int, float] = field(default_factory=dict)  # global rank -> when it was first seen gone
    killed: set[int] = field(default_factory=set)  # ranks killed here (their exit is not a cause)
    killed_for: str | None = None
    hard_deadline: float | None = None
    stalls: StallTracker | None = None  # None: hang detection off
    stall_slack_s: float = 0.0  # nodes other than 0 leave node 0 the first word on a stall
    stall: Stall | None = None
    hung: bool = False  # the job was ended for a stall (or for a stopped rank that could not answer a stop)
    last_tick: float | None = None

    def on_stop_signal(self, signum: int) -> None:
        self.stop_count += 1
        if self.stop_signal is None:
            self.stop_signal = signum

    def on_announced_stall(self, now: float) -> list[Action]:
        """Node 0 found the job stalled (a node other than 0 reads it from the shared run folder)."""
        if self.killed_for is not None:
            return []
        self.killed_for, self.hung = "stall (found by node 0)", True
        self.stall = self.stalls.snapshot(now) if self.stalls is not None else None
        return [Say("node 0 found the job stalled: capturing this node's stacks, then stopping its ranks"),
                CaptureStacks(self.stall, announced=True), KillEverything(self.killed_for)]

    def tick(self, now: float, alive: dict[int, bool], beats: dict | None = None,
             stopped: frozenset[int] = frozenset()) -> list[Action]:
        """`alive`: every rank seen so far -> whether its process still runs; `beats`: heartbeats read now
        (None between reads); `stopped`: ranks whose process is stopped (SIGSTOP)."""
        actions: list[Action] = []
        if self.stalls is not None and self.last_tick is not None and now - self.last_tick > SUSPENDED_GAP_S:
            self.stalls.shift(now - self.last_tick)  # the whole job was suspended, this launcher too
        self.last_tick = now
        if self.stalls is not None and beats:
            self.stalls.observe(now, beats)
        if self.stop_signal is not None and self.stop_sent_at is None and stopped and self.killed_for is None:
            name = signal.Signals(self.stop_signal).name
            ranks = ", ".join(str(r) for r in sorted(stopped))
            self.killed_for = f"{name}: rank(s) {ranks} stopped (SIGSTOP) and cannot save a checkpoint"
            self.hung = True
            self.stall = self.stalls.snapshot(now) if self.stalls is not None else None
            return [Say(f"{self.killed_for}: capturing the stacks, then stopping every rank at once"),
                    CaptureStacks(self.stall), KillEverything(self.killed_for)]
        if self.stop_signal is not None and self.stop_sent_at is None:
            self.stop_sent_at = now
            actions += [Say(f"{signal.Signals(self.stop_signal).name}: asking every rank to save a checkpoint and stop "
                            f"(grace {self.grace_s:.0f} s; send it again to stop at once)"),
                        SignalRanks(signal.SIGUSR1, tuple(sorted(alive)))]
        if self.stop_sent_at is not None and (self.stop_count > 1 or now - self.stop_sent_at > self.grace_s + LAUNCHER_GRACE_MARGIN_S):
            self.killed_for = "stop signal: grace period over" if self.stop_count <= 1 else "second stop signal"
            return actions + [KillEverything(self.killed_for)]
        for rank, up in alive.items():
            if not up:
                self.gone.setdefault(rank, now)
        survivors = tuple(sorted(r for r, up in alive.items() if up))
        if self.gone and survivors and self.stop_sent_at is None and self.killed_for is None:
            first_rank, first_at = min(self.gone.items(), key=lambda kv: kv[1])
            if now - first_at > self.fail_fast_s:
                self.killed_for = f"rank {first_rank} is gone"
                self.hard_deadline = now + HARD_DEADLINE_S
                self.killed.update(survivors)
                actions.append(SignalRanks(signal.SIGKILL, survivors))  # torchrun then reports and exits on its own
        if self.hard_deadline is not None and now > self.hard_deadline:
            actions.append(KillEverything(self.killed_for or "survivors did not exit"))
        if self.stalls is not None and self.stop_sent_at is None and self.killed_for is None and not self.gone:
            stall = self.stalls.check(now, self.stall_slack_s)
            if stall is not None:
                self.stall, self.killed_for, self.hung = stall, "stall", True
                actions += [Say(f"no rank made progress for {stall.idle_s:.0f} s (limit {stall.binding.limit_s:.0f} s): "
                                "capturing every rank's stack, then stopping the job"),
                            CaptureStacks(stall), KillEverything("stall")]
        return actions


# --------------------------------------------------------------------------- the end

@dataclass(frozen=True)
class Verdict:
    exit_code: int
    lines: tuple[str, ...]  # printed after the held-back lines (if shown)
    show_held: bool = True
    requeue: bool = False  # a stop by SIGTERM/USR1 under SLURM (or a stall with on_stall: requeue): node 0 requeues


def verdict(output: RankOutput, watch: Watch, code: int, node_rank: int, now: float,
            stall_lines: tuple[str, ...] | None = None, requeue_stall: bool = False) -> Verdict:
    """The launch's exit code and last lines, from its exit status and everything observed. `stall_lines`:
    the loop's account of a stall (`launch/stall.py`) when the watch ended the job for one."""
    if watch.hung:
        lines = stall_lines or (f"tune-launch: error: the job stalled ({watch.killed_for}); no stacks were captured",)
        return Verdict(EXIT_STALLED, tuple(lines), show_held=False, requeue=requeue_stall)
    code = 128 - code if code < 0 else code
    stop = watch.stop_signal
    if stop is not None and code == 0 and watch.killed_for is None:
        return Verdict(0, (f"[tune-launch] stopped by {signal.Signals(stop).name}: every rank saved the checkpoint and "
                           "exited; run the same command to resume",),
                       requeue=stop in (signal.SIGTERM, signal.SIGUSR1))
    if (stop is not None and watch.killed_for is None and output.exitcodes
            and all(c < 0 or c > 128 for c in output.exitcodes.values())):
        return Verdict(128 + stop, (f"tune-launch: error: stopped by {signal.Signals(stop).name} before the training loop "
                                    "(nothing new to save); the newest complete checkpoint, if any, is kept",))
    f = output.culprit(watch.gone, watch.killed, now) if code != 0 or output.messages else None
    if f is None:
        if code == 0:
            return Verdict(0, ())
        reason = watch.killed_for or exit_detail(code)
        return Verdict(code, (f"tune-launch: error: the launch failed ({reason}); see the rank logs above",))
    # the rank said why in its own line: the launcher's traceback about that exit is kept off the console
    hold = f.rank in output.messages and stop is None
    log = f"; traceback in {output.log_files[f.rank]}" if f.rank in output.log_files else ""
    lines = [f"tune-launch: error: rank {f.rank} (node {node_rank}) failed: {f.detail}; "
             f"every rank had exited {max(0.0, now - f.at):.1f} s later{log}"]
    # a rank that refused bad input (config, checkpoint) in one line: exit as for any bad input
    return Verdict(2 if f.refused else (code or 1), tuple(lines), show_held=not hold)
