"""The GPU fast path, decided from the typed config and the device's facts. Pure, except `DeviceFacts.probe`.

What is on by default on a CUDA GPU (each overridable in the YAML), and why:
- attention: packed rows need attention that stays inside each document without a dense mask. Order:
  `flash_attention_2` (if the flash_attn package is installed; transformers goes varlen from position_ids),
  else `tl_varlen` (PyTorch's built-in varlen flash kernel, training/varlen_attn.py), else `sdpa`
  (correct, via a block-diagonal mask, but computes the whole row). Unpacked batches keep `sdpa`.
- precision bf16 where the GPU has it (fp16 otherwise); weights are loaded in that dtype (training/model.py).
- optimizer `adamw_torch_fused` unless the YAML names one, or the optimizer runs on the CPU (offload).
- Liger kernels when installed: RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy (no logits tensor).
- torch.compile on `auto` only where it pays without Liger: Liger already fuses the memory-bound ops that
  compile would, and compile costs a minute up front; it is skipped for adapters, sharding and offload,
  where graph breaks eat the gain. bench/throughput.py measures both sides of this choice.
- micro batch and gradient checkpointing come from the launcher's memory plan (`train.micro_batch_size=N`
  overrides); `tune_launch.launch.plan.plan_batch` runs the same planner for one GPU (the benchmarks use it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from tune_launch.training.schema import TrainingConfig

LIGER_CONFIG = {"rope": True, "swiglu": True, "rms_norm": True, "cross_entropy": False,
                "fused_linear_cross_entropy": True}
NO_COMPILE_PROFILES = ("fsdp", "zero2", "zero3", "zero2-offload", "zero3-offload", "fsdp-offload")
OFFLOAD_PROFILES = ("zero2-offload", "zero3-offload", "fsdp-offload")


@dataclass(frozen=True)
class DeviceFacts:
    """What the decisions need to know about where this rank runs."""

    kind: str = "cpu"  # cpu | cuda
    name: str | None = None
    bf16: bool = False
    memory_gib: float = 0.0
    has_flash_attn: bool = False
    has_torch_varlen: bool = False
    has_liger: bool = False

    @classmethod
    def probe(cls, kind: str) -> DeviceFacts:
        """The only code here that looks at the machine: installed packages and the CUDA device 0."""
        has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
        if kind != "cuda":
            return cls(kind="cpu", has_liger=has("liger_kernel"))
        import torch

        from tune_launch.training.varlen_attn import torch_varlen_fn

        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
        return cls(kind="cuda", name=props.name if props else None,
                   bf16=bool(props and props.major >= 8),
                   memory_gib=props.total_memory / 1024**3 if props else 0.0,
                   has_flash_attn=has("flash_attn") and bool(props and props.major >= 8),
                   has_torch_varlen=torch_varlen_fn() is not None and bool(props and props.major >= 8),
                   has_liger=has("liger_kernel"))


@dataclass(frozen=True)
class PerfPlan:
    """The decisions for one run, with the reason for each (logged once at start)."""

    attn_implementation: str | None  # None: the model's default
    varlen_batches: bool  # add document boundaries to each packed batch (training/varlen_attn.VarlenCollator)
    precision: str  # bf16 | fp16 | fp32
    optimizer: str
    torch_compile: bool
    use_liger_kernel: bool
    liger_kernel_config: dict[str, bool] | None
    reasons: tuple[str, ...] = field(default_factory=tuple)


def packed_rows(cfg: TrainingConfig) -> bool:
    """Batches whose rows hold several documents told apart by position_ids (pre-training packing, TRL packing)."""
    return cfg.packing


def choose_attention(cfg: TrainingConfig, dev: DeviceFacts) -> tuple[str | None, str]:
    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation, f"attention {cfg.model.attn_implementation} (from the YAML)"
    if dev.kind != "cuda":
        return None, "attention: the model's default (CPU)"
    if not packed_rows(cfg):
        return "sdpa", "attention sdpa (unpacked, padded batches)"
    if dev.has_flash_attn:
        return "flash_attention_2", "attention flash_attention_2 varlen (packed rows, flash_attn installed)"
    if dev.has_torch_varlen:
        return "tl_varlen", "attention tl_varlen: PyTorch's varlen flash kernel (packed rows, no flash_attn package)"
    return "sdpa", "attention sdpa with a block-diagonal mask (packed rows; no varlen kernel in this torch)"


def choose_precision(cfg: TrainingConfig, dev: DeviceFacts) -> str:
    p = cfg.train.precision
    if p != "auto":
        return p
    if dev.kind != "cuda":
        return "fp32"
    return "bf16" if dev.bf16 else "fp16"


def choose_optimizer(cfg: TrainingConfig, dev: DeviceFacts, profile: str) -> tuple[str, str]:
    o = cfg.optim.optimizer
    if "optimizer" in cfg.optim.model_fields_set:
        return o, f"optimizer {o} (from the YAML)"
    if dev.kind == "cuda" and o == "adamw_torch" and profile not in OFFLOAD_PROFILES:
        return "adamw_torch_fused", "optimizer adamw_torch_fused (one kernel per step instead of one per tensor)"
    return o, f"optimizer {o}"


def choose_liger(cfg: TrainingConfig, dev: DeviceFacts) -> tuple[bool, str]:
    v = cfg.train.use_liger_kernel
    if isinstance(v, bool):
        return v, f"liger kernels {'on' if v else 'off'} (from the YAML)"
    on = dev.kind == "cuda" and dev.has_liger
    why = "installed" if on else ("not installed" if dev.kind == "cuda" else "CPU")
    return on, f"liger kernels {'on' if on else 'off'} ({why})"


def choose_compile(cfg: TrainingConfig, dev: DeviceFacts, profile: str, liger: bool) -> tuple[bool, str]:
    v = cfg.train.torch_compile
    if isinstance(v, bool):
        return v, f"torch.compile {'on' if v else 'off'} (from the YAML)"
    if dev.kind != "cuda":
        return False, "torch.compile off (CPU)"
    if cfg.model.lora is not None or cfg.model.quantization is not None:
        return False, "torch.compile off (adapters: peft/bitsandbytes layers break the graph)"
    if profile in NO_COMPILE_PROFILES:
        return False, f"torch.compile off ({profile} shards or offloads: graph breaks at every gather)"
    if liger:
        return False, "torch.compile off (Liger already fuses norm, SwiGLU, RoPE and the loss)"
    return True, "torch.compile on (full fine-tune on whole GPUs without Liger)"


def decide(cfg: TrainingConfig, dev: DeviceFacts, profile: str = "single-gpu") -> PerfPlan:
    """Every fast-path decision for this run, from the config and the device. Pure."""
    attn, why_attn = choose_attention(cfg, dev)
    precision = choose_precision(cfg, dev)
    optimizer, why_opt = choose_optimizer(cfg, dev, profile)
    liger, why_liger = choose_liger(cfg, dev)
    compile_, why_compile = choose_compile(cfg, dev, profile, liger)
    return PerfPlan(
        attn_implementation=attn,
        varlen_batches=attn == "tl_varlen" and packed_rows(cfg) and cfg.task == "pretrain",
        precision=precision, optimizer=optimizer, torch_compile=compile_, use_liger_kernel=liger,
        liger_kernel_config=dict(LIGER_CONFIG) if liger else None,
        reasons=(why_attn, f"precision {precision}", why_opt, why_liger, why_compile),
    )


def gpu_training_kwargs(cfg: TrainingConfig, dev: DeviceFacts, profile: str = "single-gpu") -> dict[str, Any]:
    """TrainingArguments fields that the fast path sets (update the base kwargs with these)."""
    plan = decide(cfg, dev, profile)
    kwargs: dict[str, Any] = {
        "bf16": plan.precision == "bf16", "fp16": plan.precision == "fp16",
        "optim": plan.optimizer,
        "torch_compile": plan.torch_compile,
        "use_liger_kernel": plan.use_liger_kernel,
    }
    if plan.use_liger_kernel:
        kwargs["liger_kernel_config"] = plan.liger_kernel_config
    if dev.kind == "cuda" and dev.bf16:  # Ampere or newer: TF32 tensor cores exist
        kwargs["tf32"] = True  # fp32 leftovers (norm statistics, optimizer math) on tensor cores
        kwargs["dataloader_pin_memory"] = True
    return kwargs


def model_load_kwargs(cfg: TrainingConfig, dev: DeviceFacts) -> dict[str, Any]:
    """from_pretrained / from_config keyword arguments: the attention implementation (registered if ours)."""
    attn, _ = choose_attention(cfg, dev)
    if attn is None:
        return {}
    if attn == "tl_varlen":
        from tune_launch.training.varlen_attn import register

        register()
    return {"attn_implementation": attn}


def wrap_collator(collator, cfg: TrainingConfig, dev: DeviceFacts):
    """The packed-row collator, with document boundaries added when the varlen attention will read them."""
    if decide(cfg, dev).varlen_batches:
        from tune_launch.training.varlen_attn import VarlenCollator

        return VarlenCollator(collator)
    return collator
