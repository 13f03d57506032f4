"""The thin layer that acts: prints plans, picks a free port, runs the launch and forwards signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TextIO

from launch.command import build_command, build_env, full_env, redact, redact_env, shell_quote
from launch.plan import LaunchPlan

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


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


def execute(plan: LaunchPlan, base_env: Mapping[str, str], stream: TextIO = sys.stderr) -> int:
    """Run this node's launch; forward signals to the whole process group; return its exit code."""
    argv = build_command(plan)
    env = full_env(plan, base_env)
    print(f"[tune-launch] {format_plan_header(plan)}", file=stream)
    print(f"[tune-launch] running: {redact(shell_quote(argv))}", file=stream, flush=True)
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
