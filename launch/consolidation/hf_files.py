"""The files around the weights: model config, tokenizer, PEFT adapter config; and tied weights from the config.

FSDP sharded checkpoints carry no config or tokenizer, so they are looked for next to the checkpoint:
the checkpoint folder, the run's output folder and its `final/` and `tokenizer/` folders, then, for
LoRA runs, the base model the adapter config names. `--config DIR` overrides the search.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tune_launch.launch.consolidation.source import ConsolidateError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
CONFIG_FILES = ("config.json", "generation_config.json")
# Decoder LMs whose only tie is the output head to the input embedding (checked against transformers' own
# `all_tied_weights_keys` in tests/test_consolidate_unit.py): a config that declares the tie needs no
# transformers import (~2-3 s) to plan a consolidation.
EMBEDDING_TIE = {"lm_head.weight": "model.embed_tokens.weight"}
KNOWN_TIES = {arch: EMBEDDING_TIE for arch in (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "StableLmForCausalLM")}


def candidate_dirs(checkpoint: Path, config_dir: Path | None) -> list[Path]:
    """Where to look for config/tokenizer files, most specific first."""
    if config_dir is not None:
        if not config_dir.is_dir():
            raise ConsolidateError(f"--config {config_dir}: not a folder; pass the folder holding config.json")
        return [config_dir]
    run = checkpoint.parent
    dirs = [checkpoint, run / "final", run, run / "tokenizer"]
    if checkpoint.name.startswith("global_step"):  # a DeepSpeed tag folder was given
        dirs = [checkpoint.parent, *dirs[1:]] + [run.parent / "final", run.parent / "tokenizer"]
    return [d for d in dirs if d.is_dir()]


def find_file(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def adapter_config(dirs: list[Path]) -> tuple[dict, Path]:
    p = find_file(dirs, "adapter_config.json")
    if p is None:
        raise ConsolidateError(f"the checkpoint holds LoRA adapters but no adapter_config.json was found in "
                               f"{', '.join(map(str, dirs)) or 'the checkpoint'}; pass --config DIR with the adapter config")
    return json.loads(p.read_text()), p


def base_model_dirs(adapter: dict) -> list[Path]:
    base = adapter.get("base_model_name_or_path")
    return [Path(base)] if base and Path(base).is_dir() else []


def lora_scaler(adapter: dict):
    """scale(module) = alpha / r (alpha / sqrt(r) with rsLoRA), honouring rank_pattern / alpha_pattern."""
    if adapter.get("peft_type", "LORA") != "LORA":
        raise ConsolidateError(f"--merge-lora: adapter type {adapter.get('peft_type')} is not LoRA")
    if adapter.get("use_dora"):
        raise ConsolidateError("--merge-lora: DoRA adapters are not supported; merge with peft's merge_and_unload")
    r0, a0 = int(adapter["r"]), float(adapter["lora_alpha"])
    rank_p, alpha_p = adapter.get("rank_pattern") or {}, adapter.get("alpha_pattern") or {}

    def match(pattern: dict, module: str, default):
        for key, value in pattern.items():
            if module.endswith(key) or module.endswith("." + key.split(".")[-1]) and key in module:
                return value
        return default

    def scale(module: str) -> float:
        r, a = int(match(rank_p, module, r0)), float(match(alpha_p, module, a0))
        return a / (r ** 0.5) if adapter.get("use_rslora") else a / r

    return scale


def model_config(dirs: list[Path]) -> tuple[dict, Path]:
    p = find_file(dirs, "config.json")
    if p is None:
        raise ConsolidateError(f"no config.json next to the checkpoint (looked in {', '.join(map(str, dirs)) or 'nothing'}); "
                               "pass --config DIR (the folder of the model's config.json, e.g. the base model)")
    try:
        return json.loads(p.read_text()), p
    except ValueError as e:
        raise ConsolidateError(f"{p}: not valid JSON ({e})") from None


def config_dtype(config: dict) -> str | None:
    return config.get("dtype") or config.get("torch_dtype")


def tied_keys(config_path: Path) -> tuple[dict[str, str], set[str] | None]:
    """{tied name: kept name} and the expected parameter names, from the model class built on the meta device."""
    raw = json.loads(config_path.read_text())
    declared = [c.get("tie_word_embeddings") for c in (raw, raw.get("text_config") or {}) if "tie_word_embeddings" in c]
    if declared and not any(declared):
        return {}, None  # declared untied: no class lookup needed (saves importing transformers, ~2 s)
    architectures = raw.get("architectures") or []
    if declared and all(declared) and len(architectures) == 1 and architectures[0] in KNOWN_TIES \
            and "text_config" not in raw:
        return dict(KNOWN_TIES[architectures[0]]), None  # declared tied, a known layout: no class lookup either
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(config_path.parent))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
        return {str(k): str(v) for k, v in ties.items()}, set(model.state_dict().keys())
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: fall back to the checkpoint's own ties
        return {}, None


def copy_side_files(dirs: list[Path], out: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        p = find_file(dirs, name)
        if p is not None and not (out / name).exists():
            shutil.copyfile(p, out / name)
            copied.append(name)
    return copied


def write_config(config: dict, dtype: str, out: Path) -> None:
    """config.json with the dtype of the written weights (transformers reads it as the default load dtype)."""
    cfg = dict(config)
    key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
    cfg[key] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
