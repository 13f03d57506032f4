"""The GPU fast path, decided from the typed config, the device's facts and the resolved settings. Pure.

What is on by default on a CUDA GPU (each overridable in the YAML), and why:
- attention: packed rows need attention that stays inside each document without a dense mask. Order:
  `flash_attention_2` (if the flash_attn package is installed; transformers goes varlen from position_ids),
  else `tl_varlen` (PyTorch's built-in varlen flash kernel, training/varlen_attn.py), else `sdpa`
  (correct, via a block-diagonal mask, but computes the whole row). Unpacked batches keep `sdpa`.
- precision, weights dtype, optimizer, Liger and torch.compile are `ResolvedSettings` (training/settings.py,
  the one resolver the launcher's plan uses too): bf16 where the GPU has it (fp16 over fp32 weights
  otherwise); `adamw_torch_fused` unless the YAML names one or the optimizer is offloaded; Liger kernels
  (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) when installed; torch.compile on `auto` only where it
  pays without Liger (not for adapters, sharding or offload, where graph breaks eat the gain).
  bench/throughput.py measures both sides of these choices.
- micro batch and gradient checkpointing come from the launcher's memory plan (rendered as overrides);
  `tune_launch.launch.plan.plan_batch` runs the same planner for one GPU (the benchmarks use it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tune_launch.profiles import get_profile
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.settings import DeviceFacts, ResolvedSettings, resolve_settings

LIGER_CONFIG = {"rope": True, "swiglu": True, "rms_norm": True, "cross_entropy": False,
                "fused_linear_cross_entropy": True}


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


def decide(cfg: TrainingConfig, dev: DeviceFacts, profile: str = "single-gpu",
           settings: ResolvedSettings | None = None) -> PerfPlan:
    """Every fast-path decision for this run, from the config, the device and the resolved settings. Pure."""
    settings = settings or resolve_settings(cfg, dev, get_profile(profile))
    attn, why_attn = choose_attention(cfg, dev)
    liger = settings.use_liger_kernel
    return PerfPlan(
        attn_implementation=attn,
        varlen_batches=attn == "tl_varlen" and packed_rows(cfg) and cfg.task == "pretrain",
        precision=settings.precision, optimizer=settings.optimizer, torch_compile=settings.torch_compile,
        use_liger_kernel=liger, liger_kernel_config=dict(LIGER_CONFIG) if liger else None,
        reasons=(why_attn, *settings.reasons),
    )


def gpu_training_kwargs(cfg: TrainingConfig, dev: DeviceFacts, profile: str = "single-gpu",
                        settings: ResolvedSettings | None = None) -> dict[str, Any]:
    """TrainingArguments fields that the fast path sets (update the base kwargs with these)."""
    plan = decide(cfg, dev, profile, settings)
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
    attn, _ = choose_attention(cfg, dev)
    if attn == "tl_varlen" and packed_rows(cfg) and cfg.task == "pretrain":
        from tune_launch.training.varlen_attn import VarlenCollator

        return VarlenCollator(collator)
    return collator
