"""The Llama-layout formula (launch/facts_formula.py) gives exactly what the meta-device build counts, for every
shipped model config and the variants the formula has to get right; anything else is left to the build."""

from __future__ import annotations

import json

import pytest
from launch_helpers import ROOT

from tune_launch.launch.facts_formula import llama_layout_facts
from tune_launch.launch.model_facts import built_facts
from tune_launch.training.schema import LoraConfig, ModelConfig

SHIPPED = sorted(p.parent.name for p in (ROOT / "examples" / "models").glob("*/config.json"))
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8)
VARIANTS = {
    "llama-gqa-tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama-head-dim": dict(model_type="llama", head_dim=48, num_key_value_heads=4),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=64),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=4),
}
LORAS = [None, LoraConfig(r=8), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])]


def _model(config: dict | None = None, path: str | None = None, lora=None) -> ModelConfig:
    return ModelConfig(config=config, config_path=path, lora=lora)


@pytest.mark.parametrize("name", SHIPPED)
def test_formula_equals_the_meta_build_for_the_shipped_configs(name):
    path = ROOT / "examples" / "models" / name / "config.json"
    for lora in LORAS:
        model = _model(path=str(path), lora=lora)
        facts = llama_layout_facts(json.loads(path.read_text()), lora)
        assert facts is not None and facts == built_facts(model), (name, lora)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_formula_equals_the_meta_build_for_the_variants(variant):
    config = {**SMALL, **VARIANTS[variant]}
    for lora in LORAS:
        assert llama_layout_facts(dict(config), lora) == built_facts(_model(config=dict(config), lora=lora)), (variant, lora)


@pytest.mark.parametrize("config", [
    {**SMALL, "model_type": "gpt2"},  # another layout
    {k: v for k, v in {**SMALL, "model_type": "llama"}.items() if k != "vocab_size"},  # a default would be guessed
    {**SMALL, "model_type": "llama", "hidden_size": "abc"},
    {**SMALL, "model_type": "llama", "num_key_value_heads": 3},  # 8 heads do not split into 3 groups
    {**SMALL, "model_type": "llama", "attention_bias": "yes"},
])
def test_anything_else_is_left_to_the_build(config):
    assert llama_layout_facts(config) is None
