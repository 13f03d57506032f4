"""The thin layer that acts: prints plans, picks a free port, runs the launch and supervises it.

Supervision (`execute`): the launch runs in its own session with stderr teed through a reader thread; what
the lines and the rank processes say is judged by the pure `launch/supervision.py` (parser, policy, verdict).
When a rank dies while others still run, the survivors get FAIL_FAST_S seconds, then SIGKILL: a rank blocked
in a collective with a dead peer cannot hang the job until the collective timeout. SIGTERM/SIGUSR1/SIGHUP/
SIGINT to the launcher become SIGUSR1 to every rank (one atomic checkpoint, clean exit; torchrun itself would
pass SIGUSR1 on as a kill), bounded by the grace period; under SLURM the job is then requeued.
Hangs (`launch/watchdog.py`, judged by `launch/stall.py`): the loop reads the ranks' heartbeats once a second;
when no rank made progress for longer than its phase allows, every rank's stack is captured, the job is
killed (a stopped rank too: it cannot answer) and the launch exits 124 with a summary of where each rank was.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from tune_launch import heartbeat
from tune_launch.launch.command import build_command, build_env, full_env, shell_quote
from tune_launch.launch.plan import LaunchPlan
from tune_launch.launch.supervision import (FAIL_FAST_S, CaptureStacks, KillEverything, RankOutput, Say, SignalRanks, Watch,
                                            verdict)
from tune_launch.launch.watchdog import REMOTE_SLACK_S, HangWatch, StallOutcome, new_attempt_id
from tune_launch.protocol import grace_seconds
from tune_launch.redaction import redact, redact_env

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


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


def requeue_command(env: Mapping[str, str], node_rank: int) -> list[str] | None:
    """`scontrol requeue JOB` from node 0 of a SLURM job, else None."""
    job = env.get("SLURM_JOB_ID")
    if env.get("TUNE_LAUNCH_REQUEUE") == "0":  # submitit requeues the job itself
        return None
    if not job or node_rank != 0 or shutil.which("scontrol", path=env.get("PATH")) is None:
        return None
    return [shutil.which("scontrol", path=env.get("PATH")) or "scontrol", "requeue", job]


class Supervisor:
    """Runs one node's launch: tees stderr, watches the rank processes, acts on `Watch`'s decisions."""

    def __init__(self, plan: LaunchPlan, argv: list[str], env: Mapping[str, str], stream: TextIO,
                 fail_fast_s: float = FAIL_FAST_S, watchdog=None) -> None:
        self.plan, self.argv, self.env, self.stream = plan, argv, dict(env), stream
        self.output = RankOutput(plan.node_rank, plan.processes_per_node)
        self.env[heartbeat.ATTEMPT_ENV] = new_attempt_id()  # marks the heartbeats of this launch's ranks
        self.hangs = self._hang_watch(watchdog)
        self.watch = Watch(grace_s=grace_seconds(env), fail_fast_s=fail_fast_s,
                           stalls=self.hangs.tracker if self.hangs else None,
                           stall_slack_s=0.0 if plan.node_rank == 0 else REMOTE_SLACK_S)
        self.ranks: dict[int, int] = {}  # pid -> global rank
        self.lock = threading.Lock()
        self.stall: StallOutcome | None = None
        self.announcement: dict | None = None  # node 0's word that the job stalled (nodes other than 0)

    def _hang_watch(self, watchdog) -> HangWatch | None:
        """Hang detection for this launch (the YAML's `watchdog:` section), None when it is off."""
        if watchdog is None or not watchdog.enabled:
            return None
        p = self.plan
        try:
            return HangWatch(p.output_dir, p.node_rank, p.nodes, p.processes_per_node, watchdog,
                             self.env[heartbeat.ATTEMPT_ENV], time.monotonic())
        except OSError as e:
            self.say(f"warning: hang detection off: cannot use {heartbeat.folder(p.output_dir)} ({e.strerror or e})")
            return None

    def say(self, text: str) -> None:
        print(f"[tune-launch] {text}", file=self.stream, flush=True)

    def _read(self, pipe) -> None:
        for line in iter(pipe.readline, ""):
            with self.lock:
                show = self.output.feed(line, time.monotonic())
            if show:
                self.stream.write(redact(line))
                self.stream.flush()

    def _find_ranks(self, proc: subprocess.Popen) -> None:
        """The launcher's direct children that torchrun exec'd as workers (LOCAL_RANK set, not accelerate itself:
        accelerate also forks short-lived helpers, an nvidia-smi probe or pre-exec copies of itself, which are
        never cached, so they are looked at again after their exec)."""
        import psutil

        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            return
        for child in children:
            if child.pid in self.ranks:
                continue
            try:
                env, cmdline = child.environ(), child.cmdline()
                if "LOCAL_RANK" not in env or any("accelerate.commands.launch" in part for part in cmdline):
                    continue
                self.ranks[child.pid] = self.output.global_rank(int(env["LOCAL_RANK"]))
            except (psutil.Error, ValueError):
                continue

    def _states(self) -> dict[int, str]:
        """Every rank seen so far -> its process status (psutil's words; 'gone' once it is reaped)."""
        import psutil

        def status(pid: int) -> str:
            try:
                return psutil.Process(pid).status()
            except psutil.Error:
                return "gone"

        states: dict[int, str] = {}
        for pid, rank in self.ranks.items():  # a rank restarted in place has two pids: a live one wins
            if states.get(rank) in (None, psutil.STATUS_ZOMBIE, "gone"):
                states[rank] = status(pid)
        return states

    def _tick(self, now: float) -> list:
        """The watch's decisions for this moment, from the processes and (once a second) the heartbeats."""
        import psutil

        states = self._states()
        alive = {r: s not in (psutil.STATUS_ZOMBIE, "gone") for r, s in states.items()}
        stopped = frozenset(r for r, s in states.items() if s == psutil.STATUS_STOPPED)
        beats = self.hangs.read(now) if self.hangs is not None else None
        actions = self.watch.tick(now, alive, beats, stopped)
        if not actions and beats is not None and self.announcement is None:
            self.announcement = self.hangs.announced()
            if self.announcement is not None:
                actions = self.watch.on_announced_stall(now)
        return actions

    def _signal(self, sig: int, ranks: tuple[int, ...]) -> None:
        for pid, rank in list(self.ranks.items()):
            if rank in ranks:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _kill_everything(self, proc: subprocess.Popen) -> None:
        self._signal(signal.SIGKILL, tuple(self.ranks.values()))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self) -> int:
        # USR1 is the ranks' "save and stop": accelerate/torchrun must ignore it, or they die of it before the save.
        proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, stderr=subprocess.PIPE,
                                text=True, errors="replace", bufsize=1,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        reader.start()
        previous = {s: signal.signal(s, lambda signum, _f: self.watch.on_stop_signal(signum)) for s in STOP_SIGNALS}
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                self._find_ranks(proc)
                if self._act(proc, self._tick(time.monotonic())):
                    break
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        reader.join(timeout=5)
        return self._finish(code)

    def _act(self, proc: subprocess.Popen, actions: list) -> bool:
        """Carry out the watch's decisions; True when the loop must end (everything was killed)."""
        for action in actions:
            if isinstance(action, Say):
                self.say(action.text)
            elif isinstance(action, SignalRanks):
                self._signal(action.signum, action.ranks)
            elif isinstance(action, CaptureStacks):
                self._capture(action)
            elif isinstance(action, KillEverything):
                self._kill_everything(proc)
                return True
        return False

    def _capture(self, action: CaptureStacks) -> None:
        """Every local rank's stack, the other nodes' summaries (node 0), the stall report; never raises."""
        if self.hangs is None:
            return
        pids = {rank: pid for pid, rank in self.ranks.items()}
        try:
            if action.announced:  # post this node's stacks, then leave node 0 the first kill and the verdict
                posted = self.hangs.on_announcement(self.announcement or {}, pids)
                self.stall = StallOutcome((*posted.lines, *self.hangs.conclusion(self.announcement or {})))
            elif action.stall is not None:
                reason = None if self.watch.killed_for == "stall" else self.watch.killed_for
                self.stall = self.hangs.on_stall(action.stall, pids, newest_checkpoint(self.plan.output_dir), reason)
        except Exception as e:  # noqa: BLE001 - a failed capture must not keep a hung job alive
            self.say(f"capturing the stacks failed ({type(e).__name__}: {e}); stopping the job anyway")

    def _finish(self, code: int) -> int:
        lines = self.stall.lines if self.stall is not None else None
        with self.lock:
            v = verdict(self.output, self.watch, code, self.plan.node_rank, time.monotonic(), lines,
                        requeue_stall=self.stall is not None and self.stall.requeue)
            held = self.output.take_held()
        if v.show_held and held:
            self.stream.write("".join(redact(line) for line in held))
        elif held:
            self._keep_held(held)
        for line in v.lines:
            print(line, file=self.stream, flush=True)
        requeue = requeue_command(self.env, self.plan.node_rank) if v.requeue else None
        if requeue:
            done = subprocess.run(requeue, capture_output=True, text=True, timeout=60)
            self.say(f"SLURM: {' '.join(requeue)} -> exit {done.returncode}")
        if self.stall is not None and self.hangs is not None:
            self.hangs.conclude(self.stall)  # last: the other nodes exit on it, and srun then ends this one
        return v.exit_code


    def _keep_held(self, held: list[str]) -> None:
        """The launcher output kept off the console goes to output_dir/logs/launch-node<N>.log."""
        path = Path(self.plan.output_dir) / "logs" / f"launch-node{self.plan.node_rank}.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(redact(line) for line in held))
        except OSError:
            return
        self.say(f"({len(held)} lines of accelerate/torchrun output about that exit: {path})")


def newest_checkpoint(output_dir: str) -> str | None:
    from tune_launch.training.checkpoint import find_resume_checkpoint

    found = find_resume_checkpoint(Path(output_dir), warn=False)
    return found.name if found is not None else None


def execute(plan: LaunchPlan, base_env: Mapping[str, str], stream: TextIO = sys.stderr, watchdog=None) -> int:
    """Run this node's launch under the supervisor; return its exit code (non-zero names the failed rank).
    `watchdog`: the YAML's `watchdog:` section (hang detection), None to run without it."""
    argv = build_command(plan)
    env = full_env(plan, base_env)
    for line in format_plan_header(plan).splitlines():
        print(f"[tune-launch] {line}", file=stream)
    print(f"[tune-launch] running: {redact(shell_quote(argv))}", file=stream, flush=True)
    return Supervisor(plan, argv, env, stream, watchdog=watchdog).run()
