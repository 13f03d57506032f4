"""Profile choice over a matrix of fake hardware and model shapes, and the memory terms against hand-computed values."""

from __future__ import annotations

import functools

import pytest
from launch_helpers import HARDWARE, MODELS, hardware, training_yaml

from tune_launch.errors import TuneLaunchError
from tune_launch.units import GIB
from tune_launch.launch.memory import Workload, estimate_memory, gpu_budget_bytes
from tune_launch.launch.model_facts import model_facts
from tune_launch.launch.plan import LaunchRequest, make_plan
from tune_launch.profiles import PROFILES
from tune_launch.training.config import load_config


@functools.lru_cache(maxsize=None)
def _facts(model: str, mode: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(training_yaml(Path(tmp), model, mode))
        return cfg, model_facts(cfg.model)


def _plan(hw_name: str, model: str, mode: str):
    cfg, facts = _facts(model, mode)
    return make_plan(LaunchRequest(config_path="train.yaml", hardware_given=True, planning=True), cfg, hardware(hw_name), facts)


def _label(plan) -> str:
    return plan.profile.name + ("+gc" if plan.settings.gradient_checkpointing else "")


# Expected choice per (hardware, model): full fine-tune, LoRA r=16, QLoRA; None = nothing fits (clear error).
# Reasoning, e.g. 7B full: pure bf16 on one GPU or DDP needs 2 + 2 + 4 B/param = 50 GiB of states + 14 GiB of
# activations at 2048 tokens -> fits 80 GiB; on 4 x 16 GiB V100s (fp16: fp32 master weights, 16 B/param) even
# ZeRO-3 needs more than the budget and CPU offload more RAM than there is -> nothing fits. 70B full on 8 x 80 GiB:
# 8 B/param / 8 = 70 GiB of sharded states alone -> only parameter offload fits.
EXPECTED = {
    ("1x24", "125m"): ("single-gpu", "single-gpu", "single-gpu"),
    ("1x24", "1.1b"): ("single-gpu", "single-gpu", "single-gpu"),
    ("1x24", "7b"): (None, "single-gpu+gc", "single-gpu"),
    ("1x24", "70b"): (None, None, "zero3-offload+gc"),
    ("1x80", "125m"): ("single-gpu", "single-gpu", "single-gpu"),
    ("1x80", "1.1b"): ("single-gpu", "single-gpu", "single-gpu"),
    ("1x80", "7b"): ("single-gpu", "single-gpu", "single-gpu"),
    ("1x80", "70b"): (None, "zero3-offload+gc", "single-gpu+gc"),
    ("4x16", "125m"): ("ddp", "ddp", "ddp"),
    ("4x16", "1.1b"): ("zero2", "ddp", "ddp"),
    ("4x16", "7b"): (None, "fsdp+gc", "ddp+gc"),
    ("4x16", "70b"): (None, None, "zero3-offload+gc"),
    ("8x80", "125m"): ("ddp", "ddp", "ddp"),
    ("8x80", "1.1b"): ("ddp", "ddp", "ddp"),
    ("8x80", "7b"): ("ddp", "ddp", "ddp"),
    ("8x80", "70b"): ("fsdp-offload+gc", "fsdp+gc", "ddp+gc"),
    ("2x8x80", "125m"): ("ddp", "ddp", "ddp"),
    ("2x8x80", "1.1b"): ("ddp", "ddp", "ddp"),
    ("2x8x80", "7b"): ("ddp", "ddp", "ddp"),
    ("2x8x80", "70b"): ("fsdp+gc", "fsdp+gc", "ddp+gc"),
}
CASES = [(hw, model, mode, want) for (hw, model), wants in EXPECTED.items() for mode, want in zip(("full", "lora", "qlora"), wants)]


@pytest.mark.parametrize("hw_name,model,mode,want", CASES, ids=[f"{h}-{m}-{o}" for h, m, o, _ in CASES])
def test_chosen_profile(hw_name, model, mode, want):
    if want is None:
        with pytest.raises(TuneLaunchError, match="nothing fits") as err:
            _plan(hw_name, MODELS[model], mode)
        assert "would fit:" in str(err.value) and "\n" not in str(err.value)
        return
    plan = _plan(hw_name, MODELS[model], mode)
    assert _label(plan) == want
    # The choice fits, and no row with a higher relative speed fits.
    assert plan.chosen.fits and plan.chosen.estimate.total <= gpu_budget_bytes(HARDWARE[hw_name]["gpu_memory_gib"])
    assert not [r for r in plan.table if r.fits and r.speed > plan.chosen.speed]
    assert plan.world_size == HARDWARE[hw_name]["nodes"] * HARDWARE[hw_name]["gpus_per_node"]


def test_cpu_only_machine_plans_the_cpu_profile():
    cfg, facts = _facts(MODELS["125m"], "full")
    plan = make_plan(LaunchRequest(config_path="t.yaml", cpu=True, planning=True), cfg, hardware("cpu"), facts)
    assert plan.profile.name == "cpu" and plan.device == "cpu" and plan.world_size == 1


def test_nothing_fits_names_the_numbers_and_alternatives():
    with pytest.raises(TuneLaunchError) as err:
        _plan("1x24", MODELS["7b"], "full")
    msg = str(err.value)
    assert "6.74B parameters" in msg and "budget 21.6 GiB per GPU x 1" in msg
    assert "LORA fits" in msg and "GPUs fit" in msg


# ----------------------------------------------------------------------------- exact counts and terms

def test_parameter_count_is_exact_and_counts_tied_embeddings_once():
    _, facts = _facts(MODELS["125m"], "full")
    v, h, i, layers = 32000, 768, 2048, 12
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
    assert facts.tied_embeddings
    assert facts.num_params == v * h + layers * per_layer + h  # lm_head shares the embedding: counted once
    _, seven = _facts(MODELS["7b"], "full")
    assert seven.num_params == 6_738_415_616  # Llama-2-7B, published figure
    _, tiny = _facts(MODELS["1.1b"], "full")
    assert tiny.num_params == 1_100_048_384  # TinyLlama-1.1B


def test_lora_parameter_count_matches_hand_count():
    _, facts = _facts(MODELS["7b"], "lora")
    h, i, r, layers = 4096, 11008, 16, 32
    per_layer = r * (4 * (h + h) + 2 * (h + i) + (i + h))  # q,k,v,o; gate, up; down
    assert facts.lora_params == layers * per_layer


@pytest.mark.parametrize("profile,master,per_param", [
    ("ddp", False, lambda n: 2 + 2 + 4),  # pure bf16: bf16 weights, bf16 grads, AdamW m+v in bf16
    ("ddp", True, lambda n: 4 + 4 + 8),  # fp32 master weights under autocast
    ("zero2", False, lambda n: 2 + (2 + 12) / n),  # bf16 weights; bf16 grads and fp32 master+m+v sharded
    ("zero3", False, lambda n: (2 + 2 + 12) / n),  # everything sharded
    ("fsdp", False, lambda n: (2 + 2 + 4) / n),
    ("fsdp", True, lambda n: (4 + 4 + 8) / n),
])
@pytest.mark.parametrize("world", [2, 8, 16])
def test_model_state_terms_equal_hand_computed(profile, master, per_param, world):
    _, facts = _facts(MODELS["7b"], "full")
    workload = Workload(micro_batch_size=1, seq_len=2048, master_weights=master)
    est = estimate_memory(PROFILES[profile], facts, world, min(world, 8), workload)
    expected = facts.num_params * per_param(world)
    assert est.model_states == pytest.approx(expected, rel=0.01)


def test_activation_term_drops_with_checkpointing_and_scales_with_tokens():
    _, facts = _facts(MODELS["7b"], "full")
    p = PROFILES["ddp"]
    base = estimate_memory(p, facts, 8, 8, Workload(micro_batch_size=1, seq_len=2048))
    double = estimate_memory(p, facts, 8, 8, Workload(micro_batch_size=2, seq_len=2048))
    gc = estimate_memory(p, facts, 8, 8, Workload(micro_batch_size=1, seq_len=2048, gradient_checkpointing=True))
    assert double.activations == pytest.approx(2 * base.activations)
    assert gc.activations < base.activations / 8
    h, kv, i = 4096, 4096, 11008
    assert base.activations == pytest.approx(2048 * 32 * (28 * h + 6 * kv + 8 * i))


def test_offload_moves_states_to_cpu_ram():
    _, facts = _facts(MODELS["7b"], "full")
    w = Workload(micro_batch_size=1, seq_len=2048)
    z3 = estimate_memory(PROFILES["zero3"], facts, 8, 8, w)
    off = estimate_memory(PROFILES["zero3-offload"], facts, 8, 8, w)
    assert off.model_states == 0 and z3.model_states > 0
    assert off.cpu_ram > z3.cpu_ram + 100 * GIB  # ~16 B/param of 6.7B moved to the node's RAM


def test_qlora_weights_are_about_half_a_byte_per_quantized_parameter():
    _, facts = _facts(MODELS["7b"], "qlora")
    est = estimate_memory(PROFILES["single-gpu"], facts, 1, 1, Workload(micro_batch_size=1, seq_len=2048, finetune="qlora"))
    linear, rest = facts.layer_linear_params, facts.num_params - facts.layer_linear_params
    frozen = linear * 0.516 + rest * 2
    assert est.weights == pytest.approx(frozen + facts.lora_params * 4, rel=0.01)
