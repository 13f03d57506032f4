"""Everything a multi-GPU profile needs to run as gloo processes on CPU, in one place.

1. FSDP: accelerate 1.15 promotes MULTI_GPU (and other accelerators) to FSDP in `AcceleratorState.__init__`,
   but not MULTI_CPU, so on CPU the FSDP plugin is dropped and training silently becomes DDP. The patch
   does for MULTI_CPU what accelerate does for GPUs. It only acts when an FSDP plugin was passed and the
   state came out MULTI_CPU; it is installed only for CPU runs.
2. DeepSpeed: on CPU the offload profiles would swap the Trainer's torch AdamW for DeepSpeedCPUAdam (a
   C++ JIT build of a minute or more) and ask for pinned memory (CUDA only). A copy of the profile's JSON
   with `zero_force_ds_cpu_optimizer: false` and `pin_memory: false` is used instead.
See docs/training.md and /work/shared/notes/cpu-rehearsal.md for the measurements behind this.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

_PATCHED = "_tune_launch_cpu_fsdp"


def promote_fsdp_on_cpu() -> None:
    """Wrap AcceleratorState.__init__ so an FSDP plugin on MULTI_CPU yields DistributedType.FSDP."""
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    original = acc_state.AcceleratorState.__init__
    if getattr(original, _PATCHED, False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            acc_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    setattr(__init__, _PATCHED, True)
    acc_state.AcceleratorState.__init__ = __init__


def cpu_deepspeed_config(ds: dict[str, Any]) -> dict[str, Any]:
    """The profile's DeepSpeed JSON made CPU-safe: torch AdamW kept, no pinned memory. Pure."""
    out = json.loads(json.dumps(ds))
    out["zero_force_ds_cpu_optimizer"] = False
    zero = out.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict):
            zero[key]["pin_memory"] = False
    return out


def rewrite_deepspeed_config(env: MutableMapping[str, str], work_dir: Path, rank: int) -> Path | None:
    """Point ACCELERATE_DEEPSPEED_CONFIG_FILE at a CPU-safe copy (one file per rank: no write race)."""
    src = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or not src or src == "none":
        return None
    ds = json.loads(Path(src).read_text())
    work_dir.mkdir(parents=True, exist_ok=True)
    dst = work_dir / f"deepspeed-cpu-rank{rank}.json"
    dst.write_text(json.dumps(cpu_deepspeed_config(ds), indent=2))
    env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(dst)
    return dst


def prepare_cpu_run(work_dir: Path, rank: int) -> None:
    """Apply the CPU adjustments; call before TrainingArguments / Trainer are built."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed then picks CPU without warning on every rank
    promote_fsdp_on_cpu()
    rewrite_deepspeed_config(os.environ, work_dir, rank)
