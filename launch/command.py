"""A `LaunchPlan` as the exact `accelerate launch` argv and environment for one node. Pure functions."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from tune_launch.launch.plan import LaunchPlan

TRAIN_MODULE = "tune_launch.training.train"  # started by module name: the same in a checkout and a wheel


def build_command(plan: LaunchPlan, node_rank: int | None = None, python: str | None = None) -> list[str]:
    """`python -m accelerate.commands.launch ...` for `node_rank` (default: the plan's own node)."""
    rank = plan.node_rank if node_rank is None else node_rank
    argv = [python or sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(plan.profile.accelerate_config_path)]
    if plan.profile.deepspeed_config_path is not None:
        argv += ["--deepspeed_config_file", str(plan.profile.deepspeed_config_path)]
    argv += ["--num_processes", str(plan.world_size), "--num_machines", str(plan.nodes)]
    if plan.world_size > 1:
        argv += ["--machine_rank", str(rank), "--main_process_ip", plan.main_process_ip,
                 "--main_process_port", str(plan.main_process_port if plan.main_process_port is not None else 0)]
    argv += ["--module", TRAIN_MODULE, str(Path(plan.config_path).resolve()), *plan.rank_overrides]
    return argv


def build_env(plan: LaunchPlan, base_env: Mapping[str, str], node_rank: int | None = None) -> dict[str, str]:
    """The variables the launch sets on top of `base_env` (only the changes; `full_env` merges them)."""
    rank = plan.node_rank if node_rank is None else node_rank
    threads = max(1, plan.cpu_cores // max(plan.processes_per_node, 1))
    env = {
        "OMP_NUM_THREADS": base_env.get("OMP_NUM_THREADS", str(threads)),
        "TOKENIZERS_PARALLELISM": "false",
        "TUNE_LAUNCH_PROFILE": plan.profile.name,
        "TUNE_LAUNCH_DEVICE": plan.device,
        "TUNE_LAUNCH_NODE_RANK": str(rank),
        "TUNE_LAUNCH_NUM_NODES": str(plan.nodes),
    }
    if plan.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["PYTORCH_CUDA_ALLOC_CONF"] = base_env.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if plan.world_size > 1:
            env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = base_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return env


def full_env(plan: LaunchPlan, base_env: Mapping[str, str], node_rank: int | None = None) -> dict[str, str]:
    merged = dict(base_env)
    merged.update(build_env(plan, base_env, node_rank))
    return merged


def shell_quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
