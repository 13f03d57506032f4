"""The shipped profiles: a name, what it shards or offloads (its traits), and the config files that implement it.

A leaf module: the launcher plans with these traits and the ranks read the same ones (by the name in
TUNE_LAUNCH_PROFILE), so a new profile is one row here. The files live in `accelerate_configs/` and
`deepspeed_configs/` at the repository root; an installed wheel carries them as `tune_launch/accelerate_configs/`
and `tune_launch/deepspeed_configs/`, beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune_launch.errors import TuneLaunchError, did_you_mean

_HERE = Path(__file__).resolve().parent
_CONFIG_ROOTS = (_HERE, _HERE.parent)  # an installed wheel (tune_launch/<folder>), a checkout (<root>/<folder>)


@dataclass(frozen=True)
class Profile:
    """A distributed strategy. The memory model reads the flags; the command builder reads the files."""

    name: str
    summary: str
    strategy: str  # "cpu" | "single" | "ddp" | "fsdp" | "deepspeed"
    accelerate_config: str
    deepspeed_config: str | None = None
    zero_stage: int = 0
    shards_optimizer: bool = False
    shards_gradients: bool = False
    shards_params: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    needs_gpu: bool = True
    multi_process: bool = True
    relative_speed: float = 1.0  # per GPU, compared with DDP; used to rank profiles that fit
    cpu_rehearsal: bool = False  # can run as N gloo processes on CPU

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer or self.offload_params

    @property
    def shards_or_offloads(self) -> bool:
        """Parameters gathered or moved at every step: torch.compile's graph breaks there eat its gain."""
        return self.shards_params or self.shards_gradients or self.offloads

    @property
    def layout_family(self) -> str:
        """Checkpoints of profiles in one family load into each other (offload or not); across families they do not."""
        if self.strategy == "deepspeed":
            return f"deepspeed-zero{self.zero_stage}"
        return "fsdp" if self.strategy == "fsdp" else "plain"

    @property
    def accelerate_config_path(self) -> Path:
        return config_file("accelerate_configs", self.accelerate_config)

    @property
    def deepspeed_config_path(self) -> Path | None:
        return config_file("deepspeed_configs", self.deepspeed_config) if self.deepspeed_config else None


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("cpu", "one process on the CPU, for development without a GPU", "cpu", "cpu.yaml",
                needs_gpu=False, multi_process=False, relative_speed=0.01),
        Profile("single-gpu", "one process on one GPU, no distributed overhead", "single", "single-gpu.yaml",
                multi_process=False, relative_speed=1.0),
        Profile("ddp", "data parallel: full model on every GPU, gradients all-reduced", "ddp", "ddp.yaml",
                relative_speed=1.0, cpu_rehearsal=True),
        Profile("zero2", "DeepSpeed ZeRO-2: optimizer states and gradients sharded", "deepspeed", "zero2.yaml",
                "zero2.json", zero_stage=2, shards_optimizer=True, shards_gradients=True, relative_speed=0.97,
                cpu_rehearsal=True),
        Profile("fsdp", "FSDP2: parameters, gradients and optimizer states sharded per layer", "fsdp", "fsdp.yaml",
                shards_optimizer=True, shards_gradients=True, shards_params=True, relative_speed=0.93,
                cpu_rehearsal=True),
        Profile("zero3", "DeepSpeed ZeRO-3: parameters, gradients and optimizer states sharded", "deepspeed",
                "zero3.yaml", "zero3.json", zero_stage=3, shards_optimizer=True, shards_gradients=True,
                shards_params=True, relative_speed=0.88, cpu_rehearsal=True),
        Profile("zero2-offload", "ZeRO-2 with optimizer states and step in CPU RAM (DeepSpeedCPUAdam)", "deepspeed",
                "zero2-offload.yaml", "zero2-offload.json", zero_stage=2, shards_optimizer=True,
                shards_gradients=True, offload_optimizer=True, relative_speed=0.6),
        Profile("zero3-offload", "ZeRO-3 with parameters and optimizer states in CPU RAM", "deepspeed",
                "zero3-offload.yaml", "zero3-offload.json", zero_stage=3, shards_optimizer=True,
                shards_gradients=True, shards_params=True, offload_optimizer=True, offload_params=True,
                relative_speed=0.35, cpu_rehearsal=True),
        Profile("fsdp-offload", "FSDP2 with parameters, gradients and optimizer states in CPU RAM", "fsdp",
                "fsdp-offload.yaml", shards_optimizer=True, shards_gradients=True, shards_params=True,
                offload_optimizer=True, offload_params=True, relative_speed=0.3),
    )
}

REHEARSAL_PROFILES = tuple(name for name, p in PROFILES.items() if p.cpu_rehearsal)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        valid = ["auto", *PROFILES]
        raise TuneLaunchError(
            f"--profile {name}: unknown profile{did_you_mean(name, valid)}; valid: {', '.join(valid)}"
        ) from None


def config_file(folder: str, filename: str) -> Path:
    """A shipped config file, from the installed package or the checkout."""
    for root in _CONFIG_ROOTS:
        path = root / folder / filename
        if path.is_file():
            return path
    raise TuneLaunchError(f"shipped config {folder}/{filename} is missing from this installation; reinstall tune-launch")


def describe_profiles() -> str:
    width = max(len(n) for n in PROFILES)
    return "\n".join(f"{name:<{width}}  {p.summary}" for name, p in PROFILES.items())
