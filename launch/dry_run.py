"""`--dry-run`: every node's command and environment, always, with the preflight findings listed beside them.

A dry run is how a user checks a launch before spending an allocation on it, so it never stops at the first
problem: the commands are printed even when preflight fails (a 2-node launch from a laptop, whose output_dir
is a local disk, or one still missing node 0's address), the findings follow them, and errors still exit 2
with one line on stderr, the same line a real launch would refuse with.
"""

from __future__ import annotations

from collections.abc import Mapping

from tune_launch.launch.plan import LaunchPlan
from tune_launch.launch.preflight import Finding, format_findings


def rendezvous_findings(plan: LaunchPlan, main_process_ip: str | None, main_process_port: int | None,
                        in_slurm: bool) -> list[Finding]:
    """What a multi-node launch outside SLURM still lacks (the plan was made with placeholders for it)."""
    if plan.nodes < 2 or in_slurm:
        return []
    found = []
    if main_process_ip is None:
        found.append(Finding("rendezvous", "error",
                             f"--main-process-ip: a multi-node launch needs the address of node 0 (the commands above "
                             f"show {plan.main_process_ip} in its place)",
                             "pass --main-process-ip with node 0's address, the same on every node (or run inside SLURM)"))
    if main_process_port is None:
        found.append(Finding("rendezvous", "error",
                             "--main-process-port: a multi-node launch needs the same port on every node (the commands "
                             "above show 0 in its place)",
                             "pass --main-process-port, e.g. 29500, the same on every node (or run inside SLURM)"))
    return found


def dry_run_report(plan: LaunchPlan, env: Mapping[str, str], findings: list[Finding]) -> str:
    """The commands (launch/run.py's format_dry_run), then the findings under a header of their own."""
    from tune_launch.launch.run import format_dry_run

    return f"{format_dry_run(plan, env)}\n\n# preflight\n{format_findings(findings)}"
