"""A `LaunchPlan` as the exact `accelerate launch` argv and environment for one node. Pure functions."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path

from launch.plan import LaunchPlan

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "training" / "train.py"
PROJECT_ROOT = TRAIN_SCRIPT.parent.parent
SECRET_NAME = re.compile(r"(?:^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?)(?:$|_)", re.I)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{30,}|xox[bap]-[A-Za-z0-9-]{10,})")


def train_script() -> Path:
    """The shared training script: from the checkout, or the installed `training` package."""
    if TRAIN_SCRIPT.is_file():
        return TRAIN_SCRIPT
    import training

    return Path(training.__file__).resolve().parent / "train.py"


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
    argv += [str(train_script()), str(Path(plan.config_path).resolve()), *plan.overrides]
    return argv


def build_env(plan: LaunchPlan, base_env: Mapping[str, str], node_rank: int | None = None) -> dict[str, str]:
    """The variables the launch sets on top of `base_env` (only the changes; `full_env` merges them)."""
    rank = plan.node_rank if node_rank is None else node_rank
    threads = max(1, plan.cpu_cores // max(plan.processes_per_node, 1))
    pythonpath = str(PROJECT_ROOT) + (":" + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
    env = {
        "OMP_NUM_THREADS": base_env.get("OMP_NUM_THREADS", str(threads)),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": pythonpath,
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


def redact(text: str) -> str:
    """Mask values that look like tokens or keys (hf_..., sk-..., AKIA...) anywhere in a string."""
    return SECRET_VALUE.sub(lambda m: m.group(0)[:3] + "***", text)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """Environment for printing: secret-looking names and values masked."""
    return {k: ("***" if SECRET_NAME.search(k) and v else redact(v)) for k, v in env.items()}


def shell_quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
