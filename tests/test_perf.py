"""CPU tests of the GPU fast path's decisions (training/perf.py), the varlen attention, best-fit packing and the
benchmark helpers. The GPU side is in tests/test_gpu_*.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from bench import common as C  # noqa: E402
from bench.throughput import grouped_rows, padded_rows, summarize  # noqa: E402
from tune_launch.training.config import validate_config  # noqa: E402
from tune_launch.launch.plan import plan_batch
from tune_launch.training.perf import decide, gpu_training_kwargs, model_load_kwargs
from tune_launch.training.settings import DeviceFacts

H100 = DeviceFacts(kind="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, memory_gib=79.2, has_torch_varlen=True)
TINYLLAMA_PARAMS = 1_100_048_384


def cfg(**over):
    raw = {"model": {"config": {k: v for k, v in C.TINY.items()}}, "tokenizer": {"train_vocab_size": 512},
           "data": {"train": {"path": "x.jsonl"}}, "max_length": 128}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(raw, "test")


# --------------------------------------------------------------------------- decisions

@pytest.mark.parametrize("dev,packing,expected", [
    (H100, True, "tl_varlen"),
    (DeviceFacts(kind="cuda", bf16=True, has_flash_attn=True, has_torch_varlen=True), True, "flash_attention_2"),
    (DeviceFacts(kind="cuda", bf16=True), True, "sdpa"),
    (H100, False, "sdpa"),
    (DeviceFacts(kind="cpu"), True, None),
])
def test_attention_for_packed_rows(dev, packing, expected):
    assert decide(cfg(packing=packing), dev).attn_implementation == expected


def test_yaml_choices_win():
    c = cfg(model={"attn_implementation": "eager"}, optim={"optimizer": "adamw_torch"},
            train={"torch_compile": False, "use_liger_kernel": False})
    plan = decide(c, DeviceFacts(kind="cuda", bf16=True, has_liger=True, has_torch_varlen=True))
    assert (plan.attn_implementation, plan.optimizer, plan.torch_compile, plan.use_liger_kernel) == \
        ("eager", "adamw_torch", False, False)


def test_gpu_defaults_without_liger():
    plan = decide(cfg(), H100)
    assert (plan.precision, plan.optimizer, plan.torch_compile, plan.use_liger_kernel) == ("bf16", "adamw_torch_fused", True, False)
    assert plan.varlen_batches


def test_liger_replaces_compile_and_configures_kernels():
    plan = decide(cfg(), DeviceFacts(kind="cuda", bf16=True, has_liger=True, has_torch_varlen=True))
    assert plan.use_liger_kernel and not plan.torch_compile
    assert plan.liger_kernel_config["fused_linear_cross_entropy"] and plan.liger_kernel_config["rms_norm"]


@pytest.mark.parametrize("profile,fused", [("single-gpu", True), ("ddp", True), ("zero3", True), ("zero3-offload", False),
                                           ("fsdp-offload", False)])
def test_fused_adamw_unless_offloaded(profile, fused):
    assert (decide(cfg(), H100, profile).optimizer == "adamw_torch_fused") is fused


def test_no_compile_for_adapters_or_sharding():
    assert not decide(cfg(model={"lora": {"r": 8}}), H100).torch_compile
    assert not decide(cfg(), H100, "fsdp").torch_compile
    assert decide(cfg(), H100, "ddp").torch_compile


def test_cpu_keeps_everything_off():
    plan = decide(cfg(), DeviceFacts(kind="cpu", has_liger=True))
    assert (plan.precision, plan.optimizer, plan.torch_compile, plan.use_liger_kernel) == ("fp32", "adamw_torch", False, False)
    assert model_load_kwargs(cfg(), DeviceFacts(kind="cpu")) == {}


def test_fp16_on_gpus_without_bf16_and_no_tf32():
    kw = gpu_training_kwargs(cfg(), DeviceFacts(kind="cuda", bf16=False, name="Tesla T4"))
    assert kw["fp16"] and not kw["bf16"] and "tf32" not in kw


def test_training_kwargs_build_real_training_arguments(tmp_path):
    from transformers import TrainingArguments

    kw = gpu_training_kwargs(cfg(), H100)
    assert kw["optim"] == "adamw_torch_fused" and kw["torch_compile"] and kw["tf32"]
    # everything perf.py sets is a TrainingArguments field (no GPU needed to check the names)
    fields = set(TrainingArguments.__dataclass_fields__)
    assert set(kw) <= fields


def test_model_load_kwargs_registers_varlen():
    from transformers import AttentionInterface

    assert model_load_kwargs(cfg(), H100) == {"attn_implementation": "tl_varlen"}
    assert "tl_varlen" in AttentionInterface().valid_keys()


def test_plan_batch_uses_the_launch_planner():
    from tune_launch.launch.model_facts import model_facts

    c = validate_config({"model": {"config": dict(C.TINYLLAMA_1B)}, "tokenizer": {"train_vocab_size": 32000},
                         "data": {"train": {"path": "x.jsonl"}}, "max_length": 2048,
                         "train": {"micro_batch_size": "auto", "gradient_checkpointing": "auto"}}, "t")
    mb, gc = plan_batch(c, H100, model_facts(c.model))
    assert mb >= 4 and gc is False  # 1.1B at 2048 fits an 80 GB GPU without checkpointing
    small = DeviceFacts(kind="cuda", bf16=True, memory_gib=16.0, has_torch_varlen=True)
    assert plan_batch(c, small, model_facts(c.model))[0] < mb
    fixed = cfg(train={"micro_batch_size": 3, "gradient_checkpointing": True})
    assert plan_batch(fixed, H100, None) == (3, True)


# --------------------------------------------------------------------------- varlen attention

def test_varlen_attention_equals_separate_documents():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune_launch.training.varlen_attn import VarlenCollator, register

    register()
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, use_cache=False, attn_implementation="tl_varlen")
    model = LlamaForCausalLM(conf)
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    ids = torch.tensor([sum(docs, [])])
    pos = torch.tensor([[i for d in docs for i in range(len(d))]])
    batch = VarlenCollator(lambda f: {"input_ids": ids, "position_ids": pos})([{}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 12] and batch["max_length_q"] == 5
    packed = model(**batch).logits
    start = 0
    for d in docs:
        alone = model(input_ids=torch.tensor([d])).logits
        assert torch.allclose(packed[:, start:start + len(d)], alone, atol=1e-5)
        start += len(d)
    model(**batch, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_varlen_call_adapts_to_torch_signatures():
    from tune_launch.training.varlen_attn import _call_kwargs

    def new(q, k, v, cq, ck, mq, mk, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
        pass

    def old(q, k, v, cq, ck, mq, mk, is_causal=False, return_aux=None):
        pass

    assert _call_kwargs(new, 32, 4, 0.1) == ({"window_size": (-1, 0), "scale": 0.1, "enable_gqa": True}, False)
    assert _call_kwargs(old, 32, 4, 0.1) == ({"is_causal": True}, True)  # repeat K/V for GQA itself
    assert _call_kwargs(old, 8, 8, None) == ({"is_causal": True}, False)


# --------------------------------------------------------------------------- packing

def test_best_fit_packing_keeps_every_token_and_wastes_little():
    from bench.legacy_data import pack_documents
    from tune_launch.training.packing import IGNORE, pack_best_fit

    docs = C.random_documents(C.lognormal_lengths(600, median=20, max_len=128, seed=3), 100, seed=3)
    rows = pack_best_fit(docs, 128, pad_id=0)
    assert all(len(r["input_ids"]) == len(r["position_ids"]) == len(r["labels"]) == 128 for r in rows)
    real = lambda rs: sum(sum(1 for x in r["labels"] if x != IGNORE) for r in rs)  # noqa: E731
    assert real(rows) == real(pack_documents(docs, 128, 0)) == sum(len(d) - 1 for d in docs)
    assert len(rows) < len(pack_documents(docs, 128, 0))
    assert 1 - real(rows) / (len(rows) * 128) < 0.08  # first token of each document and a little padding


# --------------------------------------------------------------------------- bench helpers

def test_mfu_matches_the_gpu_readme_anchor_figures():
    peak = C.peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989e12
    assert round(C.mfu(TINYLLAMA_PARAMS, 6_919, peak), 3) == 0.046
    assert round(C.mfu(TINYLLAMA_PARAMS, 52_113, peak), 3) == 0.348
    assert 67_000 < C.tokens_per_s_for_mfu(TINYLLAMA_PARAMS, 0.45, peak) < 68_000
    assert C.mfu(TINYLLAMA_PARAMS, 1000, None) is None


def test_lognormal_lengths_median_and_clip():
    import statistics

    lengths = C.lognormal_lengths(4000, median=200, max_len=2048, seed=1)
    assert 185 <= statistics.median(lengths) <= 215
    assert max(lengths) == 2048 and min(lengths) >= 2
    assert lengths == C.lognormal_lengths(4000, median=200, max_len=2048, seed=1)


def test_baseline_rows_and_padding():
    docs = [[3] * 5, [4] * 12]
    padded = padded_rows(docs, 8)
    assert [sum(r["attention_mask"]) for r in padded] == [5, 8]
    assert padded[0]["labels"][5:] == [-100] * 3
    grouped = grouped_rows(docs, 6)
    assert len(grouped) == 3 and all(len(r["input_ids"]) == 6 for r in grouped)
    assert C.padding_fraction(real_tokens=25, slots=100) == 0.75


def test_summary_speedups_and_targets():
    rows = [{"variant": "pad1024", "tokens_per_s": 6_000.0}, {"variant": "packed_fused_compile", "tokens_per_s": 50_000.0},
            {"variant": "ours", "tokens_per_s": 70_000.0, "mfu": 0.47}, {"variant": "packed", "error": "boom"}]
    s = summarize(rows, 989e12, TINYLLAMA_PARAMS)
    assert s["best_baseline"] == "packed_fused_compile"
    assert s["speedup_vs_best_baseline"] == pytest.approx(1.4) and s["speedup_vs_pad1024"] == pytest.approx(70 / 6)
    assert s["targets"] == {"mfu_at_least_0.45": True, "speedup_vs_best_at_least_1.3": True,
                            "speedup_vs_pad1024_at_least_10": True}


def test_result_path_names_device_and_date(tmp_path):
    p = C.result_path("throughput", "NVIDIA H100 80GB HBM3", "2026-11-23T10:00:00Z", tmp_path)
    assert p.name == "throughput-nvidia-h100-80gb-hbm3-2026-11-23.json"
    C.write_result(p, {"b": 1, "a": 2})
    assert json.loads(p.read_text()) == {"a": 2, "b": 1}


# --------------------------------------------------------------------------- smoke runs of the bench scripts

@pytest.mark.slow
def test_throughput_bench_cpu_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1",
                           "--variants", "packed", "ours", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("throughput-tiny-*.json")).read_text())
    assert {"device", "date", "versions"} <= set(data)
    ours = next(r for r in data["results"] if r["variant"] == "ours")
    assert ours["timed_steps"] == 2 and ours["real_tokens"] > 0 and ours["padding"] < 0.2
    assert "speedup_vs_best_baseline" in data["summary"] and "| ours |" in proc.stdout


@pytest.mark.slow
def test_memory_bench_cpu_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--device", "cpu", "--tiny", "--cases", "full", "qlora",
                           "--seq-lens", "64", "--micro-batches", "2", "--steps", "1", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("memory-tiny-*.json")).read_text())
    full, qlora = data["results"]
    assert full["case"] == "full" and full["predicted_gib"] > 0 and full["measured_reserved_gib"] is None
    assert qlora["skipped"].startswith("QLoRA trains only on a CUDA GPU")
