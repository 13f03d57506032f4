"""Exact parameter counts from a model config, built on the meta device (no weights are read or downloaded).

Both answers transformers gives here (the config builds; the facts) are cached on disk by the config's content
(launch/facts_cache.py), so a config planned or checked before costs neither the torch/transformers imports nor
the build again. Llama-layout configs (llama, mistral, qwen2) given with explicit sizes are counted by formula
(launch/facts_formula.py, checked against this build in the tests) without the imports even the first time.
Every launch first runs `check_model_config` (cached the same way): a config the ranks could not build is one
line naming the field (`model.config.hidden_size: expected int, got str ...`) before any process starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tune_launch.errors import TuneLaunchError, did_you_mean
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
    """The transformers config for a `training.config.ModelConfig` (inline dict, config.json, folder or hub name).
    A value transformers refuses or an unknown model_type is one line naming the field."""
    from transformers import AutoConfig

    try:
        if model.config is not None:
            data = dict(model.config)
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise TuneLaunchError("model.config: needs a model_type such as 'llama' to build from scratch")
            _known_model_type(model, model_type)
            return AutoConfig.for_model(model_type, **data)
        target = model.config_path or model.name_or_path
        path = Path(target).expanduser()
        if path.is_file():
            return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=model.trust_remote_code) if path.name == "config.json" \
                else _config_from_json(model, path)
        return AutoConfig.from_pretrained(target, trust_remote_code=model.trust_remote_code)
    except TuneLaunchError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers raises about a config becomes one line
        raise TuneLaunchError(_config_error(model, e)) from None


def _source(model: Any) -> str:
    if model.config is not None:
        return "model.config"
    key = "model.config_path" if model.config_path else "model.name_or_path"
    return f"{key} ({model.config_path or model.name_or_path})"


def _field(model: Any, name: str) -> str:
    """'model.config.hidden_size' for an inline config, 'model.config_path (x.json): hidden_size' otherwise."""
    return f"model.config.{name}" if model.config is not None else f"{_source(model)}: {name}"


def _known_model_type(model: Any, model_type: Any) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise TuneLaunchError(f"{_field(model, 'model_type')}: unknown model type {model_type!r}"
                              f"{did_you_mean(str(model_type), CONFIG_MAPPING.keys())}; use one transformers knows, such as 'llama'")


def _config_error(model: Any, e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    bad_field = re.search(r"field '(\w+)'", first)
    if type(e).__name__.startswith("StrictDataclass") and bad_field:
        reason = text.splitlines()[-1].strip()
        reason = re.sub(r"^\w+Error: Field '\w+' ", "", reason)
        return f"{_field(model, bad_field.group(1))}: {reason}; fix the value"
    unknown = re.search(r"model type `([^`]+)`|Unrecognized model identifier: (\S+?)\.", first)
    if unknown:
        return f"{_field(model, 'model_type')}: unknown model type '{unknown.group(1) or unknown.group(2)}'; use one transformers knows, such as 'llama'"
    if isinstance(e, (OSError, KeyError)) or model.config is None and isinstance(e, ValueError):
        return f"{_source(model)}: cannot load a model config from it ({first[:200]})"
    return f"{_source(model)}: transformers cannot build a config from it ({type(e).__name__}: {first[:200]})"


def _config_from_json(model: Any, path: Path) -> Any:
    import json

    from transformers import AutoConfig

    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "model_type" not in data:
        raise TuneLaunchError(f"{_source(model)}: a config file needs a model_type such as 'llama'")
    _known_model_type(model, data["model_type"])
    return AutoConfig.for_model(data.pop("model_type"), **data)


# sizes a decoder cannot have at 0 or below, under the names transformers' configs use for them
POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions",
                  "d_model", "ffn_dim", "num_layers", "num_heads", "n_inner")
SIZE_LIKE = re.compile(r"(^num_|^n_|_size$|_dim$|_layers$|_heads$|_embeddings$|_positions$|_experts$)")


def check_sizes(model: Any, hf: Any) -> None:
    """Sizes a model cannot be built (or trained) with: zero or negative, or attention heads that the key/value
    heads do not divide. Pure: reads the built config."""
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    values = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if (name in POSITIVE_SIZES and value <= 0) or (SIZE_LIKE.search(name) and value < 0):
            raise TuneLaunchError(f"{_field(model, name)}: {value} is not a valid size; it must be a positive integer")
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads > 0 and kv > 0 and heads % kv:
        raise TuneLaunchError(f"{_field(model, 'num_key_value_heads')}: {kv} does not divide num_attention_heads {heads}; "
                              "use a divisor of it (equal to it for plain multi-head attention)")


def build_meta_model(model_cfg: Any, hf: Any) -> Any:
    """The model on the meta device (no weights read or allocated); a config no model builds from is one line."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf, trust_remote_code=model_cfg.trust_remote_code)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise TuneLaunchError(f"model: {hf.model_type} is not a causal language model ({str(e).splitlines()[0][:160]})") from None
            raise TuneLaunchError(f"{_source(model_cfg)}: no {hf.model_type} model builds from it ({str(e).splitlines()[0][:200]})") from None
        except Exception as e:  # noqa: BLE001 - e.g. a negative size reaching a tensor, an unknown activation
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TuneLaunchError(f"{_source(model_cfg)}: no {hf.model_type} model builds from it "
                                  f"({type(e).__name__}: {first[:200]}); check its sizes and names") from None


def _cached_hub_config(model_cfg: Any) -> Any:
    """A hub model's config from the local cache only; OSError when it is not cached here."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code,
                                          local_files_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a cached config transformers refuses: one line
        raise TuneLaunchError(_config_error(model_cfg, e)) from None


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


def checked_model_config(model_cfg: Any) -> dict[str, Any] | None:
    """The model's transformers config as a dict, checked: built by transformers, its sizes positive, the model built
    on the meta device (a bad value is one TuneLaunchError line naming the field). Served from the cache when the
    same content was checked before (no torch or transformers import then). None for a hub model whose config is
    not in the hub cache here: this check never downloads (the ranks fetch it; a GPU plan loads it anyway)."""
    key = facts_cache.config_key(model_cfg)
    hit = facts_cache.read("configs", key)
    if hit is not None and isinstance(hit.get("config"), dict):
        return hit["config"]
    name = model_cfg.name_or_path
    if name is not None and not Path(str(name)).expanduser().exists():
        try:
            hf = _cached_hub_config(model_cfg)
        except OSError:
            return None
    else:
        hf = load_hf_config(model_cfg)
    check_sizes(model_cfg, hf)
    build_meta_model(model_cfg, hf)
    data = _config_dict(hf)
    facts_cache.write("configs", key, {"config": data})
    return data


def check_model_config(model_cfg: Any) -> None:
    """Refuse, before any process starts and for every profile, a model config the ranks could not build: one
    line naming the field, exit 2 (`checked_model_config`, cached by the config's content)."""
    checked_model_config(model_cfg)


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

    check_sizes(model_cfg, hf)
    model = build_meta_model(model_cfg, hf)
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
