"""8-bit LoRA (bitsandbytes LLM.int8): the config the rank builds, a real 8-bit load and forward (and a LoRA
backward) on this CPU, the memory plan at 1 byte per quantized weight, and the profiles that cannot shard 8-bit
weights. Training on a GPU: the `gpu` test at the end (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from launch_helpers import MODELS, hardware, training_yaml

from tune_launch.launch.memory import Workload, estimate_memory
from tune_launch.launch.plan import LaunchRequest, make_plan
from tune_launch.launch.preflight import Probes, evaluate
from tune_launch.profiles import PROFILES, get_profile
from tune_launch.training.config import load_config, validate_config


def _int8_cfg(model_dir, **quant):
    return validate_config({"model": {"name_or_path": str(model_dir), "lora": {"r": 4, "alpha": 8},
                                      "quantization": {"load_in_8bit": True, **quant}},
                            "data": {"generate": {"kind": "pretrain"}}, "train": {"precision": "fp32"}}, "test")


def test_bitsandbytes_config_is_llm_int8(tmp_path):
    from tune_launch.training.model import quantization_config

    qc = quantization_config(_int8_cfg(tmp_path, int8_threshold=4.0))
    assert qc.load_in_8bit is True and qc.load_in_4bit is False and qc.llm_int8_threshold == 4.0
    assert qc.quant_method == "bitsandbytes"


def test_8bit_load_forward_and_lora_backward_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tune_launch.training.model import build_model, lora_config, prepare_for_kbit
    from tune_launch.training.settings import DeviceFacts, resolve_settings

    cfg = _int8_cfg(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cpu = DeviceFacts(kind="cpu")
    settings = resolve_settings(cfg, cpu, get_profile("cpu"))
    model = build_model(cfg, tok, settings, cpu)
    int8 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert int8 and sorted(int8) == sorted(linear)  # every block linear layer is 8-bit; the LM head stays as it was
    assert all(m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # int8 rounding, not a different model
    assert model.get_memory_footprint() < 0.75 * reference.get_memory_footprint()

    from peft import get_peft_model

    net = get_peft_model(prepare_for_kbit(model, cfg, settings), lora_config(cfg))
    out = net(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads) and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # lora_B starts at 0, so A's grads are 0


def _facts(tmp: Path, model: str = "7b"):
    from tune_launch.launch.model_facts import model_facts

    cfg = load_config(training_yaml(tmp, MODELS[model], "lora"))
    return cfg, model_facts(cfg.model)


def test_memory_plan_counts_one_byte_per_quantized_weight(tmp_path):
    _, facts = _facts(tmp_path)
    single = PROFILES["single-gpu"]
    est = {mode: estimate_memory(single, facts, 1, 1, Workload(micro_batch_size=1, seq_len=2048, finetune=mode))
           for mode in ("lora", "lora-int8", "qlora")}
    linear, rest = facts.layer_linear_params, facts.num_params - facts.layer_linear_params
    assert est["lora-int8"].weights == pytest.approx(linear * 1 + rest * 2 + facts.lora_params * 4, rel=1e-6)
    assert est["qlora"].weights < est["lora-int8"].weights < est["lora"].weights
    assert est["lora-int8"].optimizer == est["lora"].optimizer  # the adapters train the same way


def _int8_yaml(tmp: Path, model: str) -> Path:
    path = training_yaml(tmp, MODELS[model], "qlora")
    data = yaml.safe_load(path.read_text())
    data["model"]["quantization"] = {"load_in_8bit": True}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("hw,model", [("4x16", "7b"), ("8x80", "70b"), ("1x24", "70b")])
def test_plan_never_shards_8bit_weights(tmp_path, hw, model):
    from tune_launch.errors import TuneLaunchError
    from tune_launch.launch.model_facts import model_facts

    cfg = load_config(_int8_yaml(tmp_path, model))
    try:
        plan = make_plan(LaunchRequest(config_path=Path("t.yaml"), hardware_given=True, planning=True), cfg,
                         hardware(hw), model_facts(cfg.model))
    except TuneLaunchError as e:  # nothing unsharded fits: the message says what would (QLoRA, more GPUs)
        assert "nothing fits" in str(e)
        return
    assert plan.workload.finetune == "lora-int8"
    assert plan.table and all(r.profile.strategy != "fsdp" and r.profile.zero_stage != 3 for r in plan.table)
    assert plan.profile.strategy != "fsdp" and plan.profile.zero_stage != 3


@pytest.mark.parametrize("profile,refused", [("ddp", False), ("zero2", False), ("zero2-offload", False), ("fsdp", True),
                                             ("fsdp-offload", True), ("zero3", True), ("zero3-offload", True)])
def test_preflight_refuses_8bit_under_sharding(tmp_path, profile, refused):
    from tune_launch.launch.model_facts import model_facts

    cfg = load_config(_int8_yaml(tmp_path, "125m"))
    plan = make_plan(LaunchRequest(config_path=Path("t.yaml"), profile=profile, hardware_given=True, planning=True), cfg,
                     hardware("8x80"), model_facts(cfg.model))
    found = [f for f in evaluate(cfg, plan, hardware("8x80"), Probes()) if f.severity == "error"]
    assert [f.check for f in found] == (["int8-sharding"] if refused else [])
    if refused:
        assert "use --profile ddp or zero2" in found[0].fix


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here: CI and CPU machines skip this)")
def test_8bit_lora_trains_on_a_gpu(tiny_model_dir, tmp_path):
    """A real launch of 8-bit LoRA on one GPU: the loss falls and only adapters are saved."""
    from conftest import check_ok, report, tiny_config, write_yaml
    import subprocess
    import sys

    from conftest import ROOT

    cfg = tiny_config(tiny_model_dir, tmp_path / "out", train={"max_steps": 20, "precision": "bf16"},
                      checkpoint={"save_steps": 20})
    cfg["model"] = {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16}, "quantization": {"load_in_8bit": True}}
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "--gpus", "1", str(write_yaml(tmp_path / "q.yaml", cfg))],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    check_ok(proc)
    r = report(tmp_path / "out")
    losses = [loss for _, loss in r["train_losses"]]
    assert r["device"] == "cuda" and sum(losses[-3:]) < sum(losses[:3])
    assert (tmp_path / "out" / "checkpoint-20" / "adapter_model.safetensors").is_file()
