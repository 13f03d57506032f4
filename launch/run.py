"""The thin layer that acts: prints plans, picks a free port, runs the launch and supervises it.

Supervision (`execute`): the launch runs in its own session with stderr teed through a reader that
notes which rank failed and why. When a rank dies while others still run, the survivors get
FAIL_FAST_S seconds, then SIGKILL: a rank blocked in a collective with a dead peer cannot hang the job
until the collective timeout. SIGTERM/SIGUSR1/SIGHUP/SIGINT to the launcher become SIGUSR1 to every
rank (one atomic checkpoint, clean exit; torchrun itself would pass SIGUSR1 on as a kill), bounded by
the grace period; under SLURM the job is then requeued.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TextIO

from tune_launch.launch.command import build_command, build_env, full_env, shell_quote
from tune_launch.redaction import redact, redact_env
from tune_launch.launch.plan import LaunchPlan

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
FAIL_FAST_S = 5.0  # a dead rank's peers get this long to exit on their own before SIGKILL
GRACE_ENV = "TUNE_LAUNCH_GRACE_S"  # ranks' stop grace (training/signals.py); the launcher allows 15 s more
DEFAULT_GRACE_S = 120.0
RANK_FAILED = re.compile(r"\[tune-launch\] rank (\d+) failed: (.*)$")
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
PEER_LOST = re.compile(r"Connection (reset|closed) by peer|remote worker|Broken pipe|communicator was aborted|"
                       r"NCCL (error|communicator)|DistBackendError|[Tt]imed? ?out|Socket Timeout", re.I)
TAGGED_LINE = re.compile(r"^(\S+ )?\[(node\d+ rank\d+|tune-launch)[\] ]")  # rank log lines and our own
USER_ERROR = re.compile(r"^(ConfigError|ConsolidateError|TuneLaunchError): ")  # a rank's one-line refusal
TORCHRUN_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_port(plan: LaunchPlan) -> LaunchPlan:
    """Single-node multi-process plans without a port get a free one now (multi-node plans must agree on one)."""
    if plan.main_process_port is None and plan.world_size > 1:
        return replace(plan, main_process_port=free_port())
    return plan


def format_plan_header(plan: LaunchPlan) -> str:
    where = "CPU" if plan.device == "cpu" else "GPU"
    lines = [f"profile   {plan.profile.name} ({plan.reason})",
             f"layout    {plan.nodes} node(s) x {plan.processes_per_node} {where} process(es) = world size {plan.world_size}"]
    if plan.chosen is not None:
        e = plan.chosen.estimate
        lines.append(f"memory    {e.total_gib:.1f} GiB per GPU estimated (budget {plan.budget_gib:.1f}), "
                     f"{e.cpu_ram_gib:.0f} GiB CPU RAM per node")
    lines += [f"note      {n}" for n in plan.notes]
    return "\n".join(lines)


def format_dry_run(plan: LaunchPlan, base_env: Mapping[str, str]) -> str:
    """The command and environment for every node, secrets masked."""
    out = [format_plan_header(plan)]
    for rank in range(plan.nodes):
        env = redact_env(build_env(plan, base_env, rank))
        out.append(f"\n# node {rank} of {plan.nodes}" + (" (this node)" if rank == plan.node_rank else ""))
        out += [f"export {k}={shell_quote([v])}" for k, v in sorted(env.items())]
        out.append(redact(shell_quote(build_command(plan, rank))))
    return "\n".join(out)


@dataclass
class Failure:
    """The first rank that failed: global rank, how, and when the launcher learnt of it."""

    rank: int
    detail: str = ""
    exitcode: int | None = None
    at: float = field(default_factory=time.monotonic)


def exit_detail(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def requeue_command(env: Mapping[str, str], node_rank: int) -> list[str] | None:
    """`scontrol requeue JOB` from node 0 of a SLURM job, else None."""
    job = env.get("SLURM_JOB_ID")
    if env.get("TUNE_LAUNCH_REQUEUE") == "0":  # submitit requeues the job itself
        return None
    if not job or node_rank != 0 or shutil.which("scontrol", path=env.get("PATH")) is None:
        return None
    return [shutil.which("scontrol", path=env.get("PATH")) or "scontrol", "requeue", job]


class Supervisor:
    """Runs one node's launch: tees stderr, watches the ranks, stops them fast on failure, gently on signals."""

    def __init__(self, plan: LaunchPlan, argv: list[str], env: Mapping[str, str], stream: TextIO,
                 fail_fast_s: float = FAIL_FAST_S) -> None:
        self.plan, self.argv, self.env, self.stream = plan, argv, dict(env), stream
        self.fail_fast_s = fail_fast_s
        try:
            self.grace_s = float(env.get(GRACE_ENV) or DEFAULT_GRACE_S)
        except ValueError:
            self.grace_s = DEFAULT_GRACE_S
        self.messages: dict[int, str] = {}  # rank -> its own one-line error, in the order they arrived
        self.exitcodes: dict[int, int] = {}  # rank -> exit code, from torchrun's report
        self.root_rank: int | None = None  # torchrun's "first observed failure"
        self.first_evidence: float | None = None
        self.killed: set[int] = set()  # ranks this supervisor SIGKILLed (their exit is not a cause)
        self.stop_signal: int | None = None
        self.stop_count = 0
        self.ranks: dict[int, int] = {}  # pid -> global rank
        self.gone: dict[int, float] = {}  # global rank -> when it was seen gone
        self.refused = False  # a rank refused bad input (USER_ERROR): hold the launcher's traceback noise
        self.held: list[str] = []
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ output

    def _global(self, local_rank: int) -> int:
        return self.plan.node_rank * self.plan.processes_per_node + local_rank

    def _read(self, pipe) -> None:
        block_rank: int | None = None
        in_root = False
        for line in iter(pipe.readline, ""):
            with self.lock:
                # After a rank refused bad input in one line, the launcher's own traceback about that exit is noise:
                # held back (shown only if the verdict turns out to be something else), rank log lines still shown.
                hold = self.refused and not TAGGED_LINE.match(line)
                if hold:
                    self.held.append(line)
            if not hold:
                self.stream.write(redact(line))
                self.stream.flush()
            with self.lock:
                self._parse(line, block_rank, in_root)
                if "Root Cause (first observed failure)" in line:
                    in_root = True
                m = SUMMARY_RANK.search(line)
                if m:
                    block_rank = self._global(int(m.group(2)))
                m = SUMMARY_EXIT.search(line)
                if m and block_rank is not None:
                    self.exitcodes[block_rank] = int(m.group(1))
                    if in_root and self.root_rank is None:
                        self.root_rank = block_rank
                    block_rank = None

    def _parse(self, line: str, block_rank: int | None, in_root: bool) -> None:
        m = RANK_FAILED.search(line)
        if m:
            self.messages.setdefault(int(m.group(1)), m.group(2).strip())
            self.refused = self.refused or bool(USER_ERROR.match(m.group(2).strip()))
            self.first_evidence = self.first_evidence or time.monotonic()
        m = TORCHRUN_FAILED.search(line)
        if m:
            rank = self._global(int(m.group(2)))
            self.exitcodes.setdefault(rank, int(m.group(1)))
            self.root_rank = rank if self.root_rank is None else self.root_rank
            self.first_evidence = self.first_evidence or time.monotonic()

    def culprit(self) -> Failure | None:
        """The rank that failed first: its own error, not a peer's 'connection reset' that followed it."""
        secondary = {r for r, msg in self.messages.items() if PEER_LOST.search(msg)}
        primaries = [r for r in self.messages if r not in secondary]
        if not primaries:
            silent = [r for r, c in self.exitcodes.items() if c != 0 and r not in secondary and r not in self.killed]
            primaries = sorted(silent, key=lambda r: (r != self.root_rank, r))
        if not primaries and self.gone:
            primaries = [min(self.gone, key=self.gone.get)]
        if not primaries:
            primaries = [r for r in (self.root_rank, *self.messages) if r is not None][:1]
        if not primaries:
            return None
        r = primaries[0]
        code = self.exitcodes.get(r)
        detail = self.messages.get(r) or (exit_detail(code) if code is not None else "exited while the other ranks were running")
        return Failure(r, detail, code, self.first_evidence or time.monotonic())

    def say(self, text: str) -> None:
        print(f"[tune-launch] {text}", file=self.stream, flush=True)

    # ------------------------------------------------------------------ the rank processes

    def _rank_processes(self, proc: subprocess.Popen) -> list:
        """The launcher's direct children are the ranks (torchrun runs inside it and starts them)."""
        import psutil

        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            return []
        for child in children:
            if child.pid not in self.ranks:
                # Only a worker torchrun exec'd counts: accelerate also forks short-lived helpers (an nvidia-smi
                # probe, pre-exec copies of itself). Those are never cached, so they are looked at again after exec.
                try:
                    env, cmdline = child.environ(), child.cmdline()
                    if "LOCAL_RANK" not in env or any("accelerate.commands.launch" in part for part in cmdline):
                        continue
                    local = int(env["LOCAL_RANK"])
                except (psutil.Error, ValueError):
                    continue
                self.ranks[child.pid] = self._global(local)
        return children

    def _alive(self, pid: int) -> bool:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _signal_ranks(self, sig: int) -> None:
        for pid in list(self.ranks):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill_all(self, proc: subprocess.Popen) -> None:
        self._signal_ranks(signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_count += 1
        if self.stop_signal is None:
            self.stop_signal = signum

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        # USR1 is the ranks' "save and stop": accelerate/torchrun must ignore it, or they die of it before the save.
        proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, stderr=subprocess.PIPE,
                                text=True, errors="replace", bufsize=1,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        reader.start()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        stop_sent_at: float | None = None
        killed_for: str | None = None
        hard_deadline: float | None = None
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                self._rank_processes(proc)
                now = time.monotonic()
                if self.stop_signal is not None and stop_sent_at is None:
                    stop_sent_at = now
                    self.say(f"{signal.Signals(self.stop_signal).name}: asking every rank to save a checkpoint and stop "
                             f"(grace {self.grace_s:.0f} s; send it again to stop at once)")
                    self._signal_ranks(signal.SIGUSR1)
                if stop_sent_at is not None and (self.stop_count > 1 or now - stop_sent_at > self.grace_s + 15):
                    killed_for = "stop signal: grace period over" if self.stop_count <= 1 else "second stop signal"
                    self._kill_all(proc)
                    break
                alive = {pid: r for pid, r in self.ranks.items() if self._alive(pid)}
                for pid, r in self.ranks.items():
                    if pid not in alive:
                        self.gone.setdefault(r, now)
                if self.gone and alive and stop_sent_at is None:
                    first_rank, first_at = min(self.gone.items(), key=lambda kv: kv[1])
                    self.first_evidence = self.first_evidence or first_at
                    if now - first_at > self.fail_fast_s and killed_for is None:
                        killed_for = f"rank {first_rank} is gone"
                        hard_deadline = now + 10
                        self.killed.update(alive.values())
                        self._signal_ranks(signal.SIGKILL)  # torchrun then reports and exits on its own
                if hard_deadline is not None and now > hard_deadline:
                    self._kill_all(proc)
                    break
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        reader.join(timeout=5)
        return self._outcome(code, killed_for)

    def _show_held(self) -> None:
        if self.held:
            self.stream.write("".join(redact(line) for line in self.held))
            self.stream.flush()
            self.held.clear()

    def _outcome(self, code: int, killed_for: str | None) -> int:
        code = 128 - code if code < 0 else code
        if self.stop_signal is not None:
            self._show_held()
        if self.stop_signal is not None and code == 0 and killed_for is None:
            self.say(f"stopped by {signal.Signals(self.stop_signal).name}: every rank saved the checkpoint and exited; "
                     "run the same command to resume")
            requeue = requeue_command(self.env, self.plan.node_rank) if self.stop_signal in (signal.SIGTERM, signal.SIGUSR1) else None
            if requeue:
                done = subprocess.run(requeue, capture_output=True, text=True, timeout=60)
                self.say(f"SLURM: {' '.join(requeue)} -> exit {done.returncode}")
            return 0
        if (self.stop_signal is not None and killed_for is None and self.exitcodes
                and all(c < 0 or c > 128 for c in self.exitcodes.values())):
            name = signal.Signals(self.stop_signal).name
            print(f"tune-launch: error: stopped by {name} before the training loop (nothing new to save); "
                  "the newest complete checkpoint, if any, is kept", file=self.stream, flush=True)
            return 128 + self.stop_signal
        with self.lock:
            f = self.culprit() if code != 0 or self.messages else None
        if f is None:
            self._show_held()
            if code == 0:
                return 0
            reason = killed_for or exit_detail(code)
            print(f"tune-launch: error: the launch failed ({reason}); see the rank logs above", file=self.stream, flush=True)
            return code
        user_error = bool(USER_ERROR.match(f.detail))
        if not user_error:
            self._show_held()
        elif self.held:
            self.say(f"({len(self.held)} lines of launcher traceback about that exit not shown)")
        elapsed = max(0.0, time.monotonic() - f.at)
        print(f"tune-launch: error: rank {f.rank} (node {self.plan.node_rank}) failed: {f.detail}; "
              f"every rank had exited {elapsed:.1f} s later", file=self.stream, flush=True)
        if user_error:
            return 2  # the rank refused bad input (config, checkpoint) in one line: exit as for any bad input
        return code or 1


def execute(plan: LaunchPlan, base_env: Mapping[str, str], stream: TextIO = sys.stderr) -> int:
    """Run this node's launch under the supervisor; return its exit code (non-zero names the failed rank)."""
    argv = build_command(plan)
    env = full_env(plan, base_env)
    for line in format_plan_header(plan).splitlines():
        print(f"[tune-launch] {line}", file=stream)
    print(f"[tune-launch] running: {redact(shell_quote(argv))}", file=stream, flush=True)
    return Supervisor(plan, argv, env, stream).run()
