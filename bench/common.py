"""Shared by the benchmarks: the JSON header (device, date, versions), MFU, synthetic lengths, result files.

Pure helpers except `header()` and `device_name()`, which look at the machine. MFU follows the issue's
definition: 6 x parameters x real (loss-carrying) tokens/s over the device's dense bf16 peak; the attention
FLOPs are not counted, so skipping cross-document attention does not inflate it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import random
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VERSION_PACKAGES = ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "liger_kernel",
                    "flash_attn", "deepspeed", "triton")
TINYLLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False)
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def mfu(params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 N T / peak (None when the peak is unknown)."""
    if not peak_flops:
        return None
    return 6.0 * params * tokens_per_s / peak_flops


def tokens_per_s_for_mfu(params: int, target_mfu: float, peak_flops: float) -> float:
    return target_mfu * peak_flops / (6.0 * params)


def lognormal_lengths(n: int, median: float = 200.0, sigma: float = 1.0, max_len: int = 2048, min_len: int = 2,
                      seed: int = 0) -> list[int]:
    """Document lengths drawn from a log-normal with the given median (exp(mu)), clipped to [min_len, max_len]."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [max(min_len, min(max_len, int(round(rng.lognormvariate(mu, sigma))))) for _ in range(n)]


def random_documents(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (ids 0-2 reserved: pad/bos/eos) for each length."""
    rng = random.Random(seed + 1)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def padding_fraction(real_tokens: int, slots: int) -> float:
    """Share of the positions that could carry loss (rows x (length - 1), after the shift) but carry none."""
    return 0.0 if slots <= 0 else 1.0 - real_tokens / slots


def loss_tokens(labels) -> int:
    """Tokens whose prediction enters the loss: labels after the causal shift that are not -100."""
    return int((labels[..., 1:] != -100).sum())


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                out[pkg] = "not installed"
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def peak_flops(name: str) -> float | None:
    from tune_launch.gpus import peak_bf16_flops

    return peak_bf16_flops(name)


def header(device: str) -> dict[str, Any]:
    """Where and when a result was measured."""
    name = device_name(device)
    return {"device": name, "device_kind": device, "peak_bf16_flops": peak_flops(name),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": platform.node(),
            "versions": versions()}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def result_path(kind: str, device: str, date: str, out_dir: Path | None = None) -> Path:
    """bench/results/<kind>-<device>-<YYYY-MM-DD>.json"""
    return (out_dir or RESULTS) / f"{kind}-{slug(device)[:40]}-{date[:10]}.json"


def write_result(path: Path, data: dict[str, Any]) -> Path:
    """Atomic write (tmp + rename) with sorted keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, title, format spec); a missing or None value prints as n/a."""
    lines = ["| " + " | ".join(t for _, t, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("n/a" if v is None else (format(v, spec) if spec else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
