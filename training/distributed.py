"""Who this process is (rank, node, device), read once from the environment the launcher set."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    """The process's place in the job. `node_rank` comes from torchrun (GROUP_RANK) or tune-launch."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    device: str = "cpu"  # cpu | cuda
    profile: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tag(self) -> str:
        return f"node{self.node_rank} rank{self.rank}"

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        env = os.environ if env is None else env

        def num(*names: str, default: int) -> int:
            for name in names:
                value = env.get(name, "")
                if value.strip().lstrip("-").isdigit():
                    return int(value)
            return default

        world = num("WORLD_SIZE", default=1)
        local_world = num("LOCAL_WORLD_SIZE", default=world)
        rank = num("RANK", default=0)
        device = env.get("TUNE_LAUNCH_DEVICE") or ("cuda" if _cuda_visible(env) else "cpu")
        return cls(
            rank=rank,
            local_rank=num("LOCAL_RANK", default=0),
            world_size=world,
            local_world_size=local_world,
            node_rank=num("GROUP_RANK", "TUNE_LAUNCH_NODE_RANK", "NODE_RANK", default=rank // max(local_world, 1)),
            num_nodes=num("TUNE_LAUNCH_NUM_NODES", default=max(world // max(local_world, 1), 1)),
            device=device if device in ("cpu", "cuda") else "cpu",
            profile=env.get("TUNE_LAUNCH_PROFILE") or profile_from_accelerate_env(env, device, world),
        )


def profile_from_accelerate_env(env: Mapping[str, str], device: str, world_size: int) -> str:
    """The profile of a rank started by a bare `accelerate launch --config_file <shipped profile>` (no tune-launch
    to set TUNE_LAUNCH_PROFILE): read from the variables accelerate exports, so its traits are still right."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() not in ("", "none")
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if path and path != "none":
            try:
                import json

                zero = json.loads(open(path, encoding="utf-8").read()).get("zero_optimization", {})
                stage = str(zero.get("stage", stage))
                offload = offload or str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() != "none"
            except (OSError, ValueError, AttributeError):
                pass
        name = "zero3" if stage == "3" else "zero2"
        return f"{name}-offload" if offload else name
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp-offload" if env.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true" else "fsdp"
    if world_size > 1:
        return "ddp"
    return "cpu" if device == "cpu" else "single-gpu"


def _cuda_visible(env: Mapping[str, str]) -> bool:
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def barrier() -> None:
    """A barrier when a process group exists; a no-op for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Barrier, then destroy the process group so every rank leaves the collective cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_ranks_sum(values: list[float]) -> list[float]:
    """Sum of `values` over ranks (gloo/nccl), e.g. to count parameters held across the job."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return [float(v) for v in t.cpu()]
