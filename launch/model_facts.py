"""Exact parameter counts from a model config, built on the meta device (no weights are read or downloaded).

Both answers transformers gives here (the config builds; the facts) are cached on disk by the config's content
(launch/facts_cache.py), so a config planned or checked before costs neither the torch/transformers imports nor
the build again. Llama-layout configs (llama, mistral, qwen2) given with explicit sizes are counted by formula
(launch/facts_formula.py, checked against this build in the tests) without the imports even the first time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tune_launch.errors import TuneLaunchError
from tune_launch.launch import facts_cache


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about a model. Counts are exact, tied weights counted once."""

    num_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool
    layer_params: int  # parameters of one transformer block (the FSDP / ZeRO-3 gather unit)
    layer_linear_params: int  # nn.Linear weights inside the blocks (what QLoRA quantizes)
    lora_params: int = 0  # trainable adapter parameters for the YAML's LoRA settings (0 without LoRA)
    model_type: str = "unknown"

    @property
    def kv_size(self) -> int:
        return self.hidden_size * self.num_kv_heads // max(self.num_heads, 1)


def load_hf_config(model: Any) -> Any:
    """The transformers config for a `training.config.ModelConfig` (inline dict, config.json, folder or hub name)."""
    from transformers import AutoConfig

    try:
        if model.config is not None:
            data = dict(model.config)
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise TuneLaunchError("model.config: needs a model_type such as 'llama' to build from scratch")
            return AutoConfig.for_model(model_type, **data)
        target = model.config_path or model.name_or_path
        path = Path(target).expanduser()
        if path.is_file():
            return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=model.trust_remote_code) if path.name == "config.json" \
                else _config_from_json(path)
        return AutoConfig.from_pretrained(target, trust_remote_code=model.trust_remote_code)
    except TuneLaunchError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        where = "model.config" if model.config is not None else ("model.config_path" if model.config_path else "model.name_or_path")
        raise TuneLaunchError(f"{where}: cannot load a model config from '{model.config_path or model.name_or_path or 'inline'}' ({first[:200]})") from None


def _config_from_json(path: Path) -> Any:
    import json

    from transformers import AutoConfig

    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _lora_targets(model: Any, target_modules: Any) -> list[tuple[int, int]]:
    import torch

    shapes = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear" or leaf in target_modules:
            shapes.append((module.in_features, module.out_features))
    return shapes


def checked_model_config(model_cfg: Any) -> dict[str, Any]:
    """The model's transformers config as a dict, checked by transformers (a bad value is one TuneLaunchError line).

    Served from the cache when the same content was checked before (no transformers import then); for a launch
    that needs no memory plan this is all the launcher asks of transformers."""
    key = facts_cache.config_key(model_cfg)
    hit = facts_cache.read("configs", key)
    if hit is not None and isinstance(hit.get("config"), dict):
        return hit["config"]
    hf = load_hf_config(model_cfg)
    data = _config_dict(hf)
    facts_cache.write("configs", key, {"config": data})
    return data


def _config_dict(hf: Any) -> dict[str, Any]:
    return json.loads(hf.to_json_string(use_diff=False))


def model_facts(model_cfg: Any, use_cache: bool = True) -> ModelFacts:
    """Exact counts for a training `ModelConfig`: from the cache, else built on the meta device (and cached)."""
    key = facts_cache.facts_key(model_cfg) if use_cache else None
    hit = facts_cache.read("facts", key)
    if hit is not None:
        try:
            return ModelFacts(**hit["facts"])
        except (KeyError, TypeError):  # an entry from another version of ModelFacts: rebuild it
            pass
    facts = _counted_from_config_file(model_cfg)
    if facts is None:
        facts = built_facts(model_cfg, cache_config=use_cache)
    if use_cache:
        facts_cache.write("facts", key, {"facts": asdict(facts)})
    return facts


def built_facts(model_cfg: Any, cache_config: bool = False) -> ModelFacts:
    """The reference: load the config with transformers, build the model on the meta device, count."""
    hf = load_hf_config(model_cfg)
    if cache_config:
        facts_cache.write("configs", facts_cache.config_key(model_cfg), {"config": _config_dict(hf)})
    return _count(model_cfg, hf)


def _counted_from_config_file(model_cfg: Any) -> ModelFacts | None:
    """The Llama-layout formula (launch/facts_formula.py) on the config as written, without transformers."""
    from tune_launch.launch.facts_formula import llama_layout_facts

    if model_cfg.trust_remote_code:
        return None
    data = model_cfg.config
    if data is None:
        path = facts_cache.config_file(model_cfg)
        try:
            data = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None
    return llama_layout_facts(dict(data), model_cfg.lora) if isinstance(data, dict) else None


def _count(model_cfg: Any, hf: Any) -> ModelFacts:
    """Build the model on the meta device and count exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(hf, trust_remote_code=model_cfg.trust_remote_code)
        except ValueError as e:
            raise TuneLaunchError(f"model: {hf.model_type} is not a causal language model ({str(e).splitlines()[0][:160]})") from None
    num_params = sum(p.numel() for p in model.parameters())  # parameters() yields shared (tied) tensors once
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    blocks = _transformer_blocks(model)
    layer_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=num_params)
    layer_linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    lora_params = 0
    if model_cfg.lora is not None:
        lora_params = sum(model_cfg.lora.r * (i + o) for i, o in _lora_targets(model, model_cfg.lora.target_modules))
    heads = getattr(text, "num_attention_heads", 1)
    return ModelFacts(
        num_params=num_params,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size) or 4 * text.hidden_size,
        num_layers=len(blocks) or getattr(text, "num_hidden_layers", 1),
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab_size=text.vocab_size,
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        layer_params=layer_params,
        layer_linear_params=layer_linear,
        lora_params=lora_params,
        model_type=hf.model_type,
    )


def _transformer_blocks(model: Any) -> list[Any]:
    """The repeated decoder blocks (classes named in `_no_split_modules`), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
