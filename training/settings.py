"""Every `auto` in the YAML resolved by one function, so the launcher and the ranks cannot disagree.

The launcher's plan calls `resolve_settings` with the hardware it plans for (and the micro batch and
checkpointing its memory plan chose), preflight reads the plan's copy, and the command builder renders the
values the YAML left `auto` as `key=value` overrides for the ranks (`as_overrides`). A rank resolves again
with its own device facts; for a launched rank every one of these values is then explicit, so the answer is
the launcher's; a rank started by hand without the launcher gets the same rules. Pure: facts in, values out.

Precision on a GPU without bf16 (V100, T4): fp16 autocast over fp32 weights (the GradScaler refuses to
unscale fp16 gradients), so the plan estimates fp32 masters, the model loads fp32, the trainer sets fp16.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from tune_launch.profiles import Profile
from tune_launch.units import GIB
from tune_launch.training.schema import TrainingConfig

CPU_MICRO_BATCH = 8  # CPU runs have no memory plan: a batch that keeps both cores busy on the tiny models
GPU_MICRO_BATCH_UNPLANNED = 1  # a rank started without the launcher's plan and `micro_batch_size: auto`
DTYPE_OF_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
                   memory_gib=props.total_memory / GIB if props else 0.0,
                   has_flash_attn=has("flash_attn") and bool(props and props.major >= 8),
                   has_torch_varlen=torch_varlen_fn() is not None and bool(props and props.major >= 8),
                   has_liger=has("liger_kernel"))


@dataclass(frozen=True)
class ResolvedSettings:
    """The values a run trains with, every `auto` decided; `reasons` say why (logged once by rank 0)."""

    precision: str  # compute: bf16 | fp16 | fp32
    weights_dtype: str  # the dtype the model is loaded in: bfloat16 | float16 | float32
    micro_batch_size: int
    gradient_checkpointing: bool
    use_liger_kernel: bool
    torch_compile: bool
    optimizer: str
    auto_keys: frozenset[str] = field(default_factory=frozenset)  # YAML keys these values replaced an `auto` of
    reasons: tuple[str, ...] = ()

    @property
    def master_weights(self) -> bool:
        """fp32 weights under a lower-precision autocast (fp16, or model.dtype float32 with bf16)."""
        return self.weights_dtype == "float32" and self.precision != "fp32"

    def value_of(self, key: str) -> str:
        v = {"train.precision": self.precision, "model.dtype": self.weights_dtype,
             "train.micro_batch_size": self.micro_batch_size, "train.gradient_checkpointing": self.gradient_checkpointing,
             "train.use_liger_kernel": self.use_liger_kernel, "train.torch_compile": self.torch_compile,
             "optim.optimizer": self.optimizer}[key]
        return str(v).lower() if isinstance(v, bool) else str(v)

    def as_overrides(self) -> tuple[str, ...]:
        """`key=value` for every YAML key that was `auto` (or unset, for the optimizer): what the ranks are told."""
        return tuple(f"{key}={self.value_of(key)}" for key in RESOLVED_KEYS if key in self.auto_keys)


RESOLVED_KEYS = ("train.precision", "model.dtype", "train.micro_batch_size", "train.gradient_checkpointing",
                 "train.use_liger_kernel", "train.torch_compile", "optim.optimizer")


def resolve_precision(cfg: TrainingConfig, dev: DeviceFacts) -> str:
    p = cfg.train.precision
    if p != "auto":
        return p
    if dev.kind != "cuda":
        return "fp32"
    return "bf16" if dev.bf16 else "fp16"


def resolve_weights_dtype(cfg: TrainingConfig, dev: DeviceFacts, precision: str) -> str:
    """The YAML's model.dtype, else bf16 weights for bf16 on a GPU (pure bf16, torchtune-style), else fp32."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if dev.kind == "cuda" and precision == "bf16" else "float32"


def resolve_optimizer(cfg: TrainingConfig, dev: DeviceFacts, profile: Profile) -> tuple[str, str]:
    o = cfg.optim.optimizer
    if "optimizer" in cfg.optim.model_fields_set:
        return o, f"optimizer {o} (from the YAML)"
    if dev.kind == "cuda" and o == "adamw_torch" and not profile.offloads:
        return "adamw_torch_fused", "optimizer adamw_torch_fused (one kernel per step instead of one per tensor)"
    return o, f"optimizer {o}"


def resolve_liger(cfg: TrainingConfig, dev: DeviceFacts) -> tuple[bool, str]:
    v = cfg.train.use_liger_kernel
    if isinstance(v, bool):
        return v, f"liger kernels {'on' if v else 'off'} (from the YAML)"
    on = dev.kind == "cuda" and dev.has_liger
    why = "installed" if on else ("not installed" if dev.kind == "cuda" else "CPU")
    return on, f"liger kernels {'on' if on else 'off'} ({why})"


def resolve_compile(cfg: TrainingConfig, dev: DeviceFacts, profile: Profile, liger: bool) -> tuple[bool, str]:
    v = cfg.train.torch_compile
    if isinstance(v, bool):
        return v, f"torch.compile {'on' if v else 'off'} (from the YAML)"
    if dev.kind != "cuda":
        return False, "torch.compile off (CPU)"
    if cfg.model.lora is not None or cfg.model.quantization is not None:
        return False, "torch.compile off (adapters: peft/bitsandbytes layers break the graph)"
    if profile.shards_or_offloads:
        return False, f"torch.compile off ({profile.name} shards or offloads: graph breaks at every gather)"
    if liger:
        return False, "torch.compile off (Liger already fuses norm, SwiGLU, RoPE and the loss)"
    return True, "torch.compile on (full fine-tune on whole GPUs without Liger)"


def resolve_settings(cfg: TrainingConfig, dev: DeviceFacts, profile: Profile, *, micro_batch_size: int | None = None,
                     gradient_checkpointing: bool | None = None) -> ResolvedSettings:
    """Every `auto` decided for this device and profile. `micro_batch_size` / `gradient_checkpointing`: what the
    launcher's memory plan chose for `auto` ones (None without a plan: the CPU batch, or 1 on a GPU; no checkpointing)."""
    t = cfg.train
    auto = {key for key, value in (("train.precision", t.precision), ("model.dtype", cfg.model.dtype),
                                   ("train.micro_batch_size", t.micro_batch_size),
                                   ("train.gradient_checkpointing", t.gradient_checkpointing),
                                   ("train.use_liger_kernel", t.use_liger_kernel), ("train.torch_compile", t.torch_compile))
            if value == "auto"}
    if "optimizer" not in cfg.optim.model_fields_set:
        auto.add("optim.optimizer")
    precision = resolve_precision(cfg, dev)
    weights = resolve_weights_dtype(cfg, dev, precision)
    optimizer, why_opt = resolve_optimizer(cfg, dev, profile)
    liger, why_liger = resolve_liger(cfg, dev)
    compile_, why_compile = resolve_compile(cfg, dev, profile, liger)
    if isinstance(t.micro_batch_size, int):
        mb = t.micro_batch_size
    else:
        mb = micro_batch_size or (CPU_MICRO_BATCH if dev.kind != "cuda" else GPU_MICRO_BATCH_UNPLANNED)
    gc = t.gradient_checkpointing if isinstance(t.gradient_checkpointing, bool) else bool(gradient_checkpointing)
    return ResolvedSettings(
        precision=precision, weights_dtype=weights, micro_batch_size=mb, gradient_checkpointing=gc,
        use_liger_kernel=liger, torch_compile=compile_, optimizer=optimizer, auto_keys=frozenset(auto),
        reasons=(f"precision {precision}, weights {weights}", why_opt, why_liger, why_compile),
    )
