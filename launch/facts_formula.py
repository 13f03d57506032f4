"""Exact parameter counts for the Llama module layout (llama, mistral, qwen2) from config.json alone.

The meta-device build in launch/model_facts.py is the reference; it costs the torch and transformers imports
(~3 s on a 2-core machine) the first time a config is planned. These three families share one layout
(embedding, per block q/k/v/o and gate/up/down projections with two RMSNorms, a final norm, an untied or tied
head), so their counts are a few products. A config is counted here only when every size is given explicitly
as a positive integer and the family is one of FAMILIES; anything else (other families, missing or odd
fields, remote code) returns None and goes to the meta build. tests/test_facts_formula.py checks the two agree
on every shipped model config and on the variants (GQA, explicit head_dim, biases, tied embeddings, LoRA).
"""

from __future__ import annotations

from typing import Any

from tune_launch.launch.model_facts import ModelFacts

# model_type -> (bias on q/k/v, bias on o, bias on the MLP); None: read attention_bias / mlp_bias from the config
FAMILIES: dict[str, tuple[bool | None, bool | None, bool | None]] = {
    "llama": (None, None, None),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def llama_layout_facts(config: dict[str, Any], lora: Any = None) -> ModelFacts | None:
    """ModelFacts for a llama/mistral/qwen2 config dict, or None when it must be built to be counted."""
    family = FAMILIES.get(str(config.get("model_type")))
    if family is None or not all(_positive_int(config.get(k)) for k in REQUIRED):
        return None
    h, inter, layers, heads = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (h // heads if h % heads == 0 else None)
    flags = [config.get(k, False) for k in ("attention_bias", "mlp_bias")]
    if not (_positive_int(kv) and _positive_int(head_dim) and heads % kv == 0 and all(isinstance(f, bool) for f in flags)):
        return None
    qkv_bias, o_bias, mlp_bias = (flags[0] if family[0] is None else family[0], flags[0] if family[1] is None else family[1],
                                  flags[1] if family[2] is None else family[2])
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        return None
    shapes = {"q_proj": (h, heads * head_dim, qkv_bias), "k_proj": (h, kv * head_dim, qkv_bias),
              "v_proj": (h, kv * head_dim, qkv_bias), "o_proj": (heads * head_dim, h, o_bias),
              "gate_proj": (h, inter, mlp_bias), "up_proj": (h, inter, mlp_bias), "down_proj": (inter, h, mlp_bias)}
    linear = sum(i * o for i, o, _ in shapes.values())
    layer = linear + sum(o for _, o, b in shapes.values() if b) + 2 * h  # + biases + the two RMSNorm weights
    vocab = config["vocab_size"]
    total = vocab * h + layers * layer + h + (0 if tied else vocab * h)
    lora_params = 0
    if lora is not None:
        targets = PROJECTIONS if lora.target_modules == "all-linear" else [p for p in PROJECTIONS if p in lora.target_modules]
        lora_params = layers * sum(lora.r * (shapes[p][0] + shapes[p][1]) for p in targets)
    return ModelFacts(num_params=total, hidden_size=h, intermediate_size=inter, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, vocab_size=vocab, tied_embeddings=tied, layer_params=layer,
                      layer_linear_params=layers * linear, lora_params=lora_params, model_type=str(config["model_type"]))
