"""The output, planned before any byte is read: names, dtypes, LoRA merges, tied weights, shard files.

Pure functions of the source plan and the options, so the whole layout (and each safetensors header)
is known up front and every file can then be streamed in one pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tune_launch.launch.consolidation.source import ConsolidateError, Source, SourceTensor
from tune_launch.launch.consolidation.torchzip import ITEMSIZE

PEFT_PREFIX = "base_model.model."
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: `source` is read; with `lora` = (A, B, scale) the delta B@A*scale is added."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    lora: tuple[str, str, float] | None = None
    transpose_delta: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Shard:
    file: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class OutputPlan:
    kind: str  # "model" (full weights) | "adapter" (PEFT adapter folder)
    shards: list[Shard]
    dropped_ties: dict[str, str] = field(default_factory=dict)

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal like transformers), '2GiB' -> 2*2**30, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConsolidateError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def output_dtype(option: str, config_dtype: str | None) -> str:
    """--dtype: bf16/fp16/fp32, or auto = the dtype the model config names (fp32 when it names none)."""
    if option == "auto":
        return config_dtype if config_dtype in ("bfloat16", "float16", "float32") else "float32"
    if option not in DTYPE_NAMES:
        raise ConsolidateError(f"--dtype {option!r}: use bf16, fp16, fp32 or auto")
    return DTYPE_NAMES[option]


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def lora_modules(src: Source) -> dict[str, tuple[str, str]]:
    """module path -> (lora_A name, lora_B name) for every LoRA adapter in the checkpoint."""
    found: dict[str, dict[str, str]] = {}
    for t in src.tensors:
        m = _LORA.match(t.name)
        if m:
            found.setdefault(_strip(m.group("module")), {})[m.group("ab")] = t.name
    if any(".modules_to_save." in t.name for t in src.tensors):
        raise ConsolidateError("LoRA modules_to_save are not supported yet; merge with peft's merge_and_unload")
    broken = [k for k, v in found.items() if set(v) != {"A", "B"}]
    if broken:
        raise ConsolidateError(f"LoRA module {broken[0]} has only lora_{next(iter(found[broken[0]]))}; the checkpoint is incomplete")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def plan_model(src: Source, dtype: str, tied: dict[str, str], lora_scale=None, fan_in_fan_out: bool = False) -> tuple[list[OutputTensor], dict[str, str]]:
    """Full-model tensors: PEFT names stripped, adapters merged (lora_scale(module) -> float), ties dropped."""
    loras = lora_modules(src)
    if loras and lora_scale is None:
        raise ConsolidateError("internal: LoRA checkpoint planned as a model without a LoRA scale")
    skip = {n for ab in loras.values() for n in ab}
    out: list[OutputTensor] = []
    for t in src.tensors:
        if t.name in skip:
            continue
        name, lora = _strip(t.name).replace(".base_layer.", "."), None
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in loras:
            a, b = loras[module]
            lora = (a, b, float(lora_scale(module)))
        out.append(OutputTensor(name, t.shape, _target(t, dtype), t.name, lora, fan_in_fan_out))
    ties = {**tied}
    names = {t.name for t in out}
    tied = {k: v for k, v in ties.items() if v in names and k != v}  # written once (the kept name), tied on load
    return [t for t in out if t.name not in tied], tied


def plan_adapter(src: Source, dtype: str) -> list[OutputTensor]:
    """PEFT adapter tensors named as adapter_model.safetensors names them (adapter name removed)."""
    out = []
    for t in src.tensors:
        m = _LORA.match(t.name)
        if m:
            adapter = f".{m.group('adapter')}" if m.group("adapter") else ""
            name = t.name.replace(f".lora_{m.group('ab')}{adapter}.", f".lora_{m.group('ab')}.")
            out.append(OutputTensor(name, t.shape, _target(t, dtype), t.name))
    return out


def _target(t: SourceTensor, dtype: str) -> str:
    """Floating tensors take the output dtype; integer/bool buffers keep theirs."""
    return dtype if t.dtype in ("float32", "float16", "bfloat16", "float64") else t.dtype


def plan_shards(tensors: list[OutputTensor], max_bytes: int, stem: str = "model") -> list[Shard]:
    """Greedy in saved order; a tensor larger than the limit gets a file of its own (as transformers does)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    groups = [g for g in groups if g]
    n = len(groups)
    return [Shard(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]
