"""The GPU fast path on a CUDA GPU: the varlen kernel gives the same attention as separate documents (forward
and backward), the decisions on this device, and a full-fine-tune step with them. Skipped without a GPU."""

from __future__ import annotations


import pytest
import torch


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (none here: CI and CPU machines skip this)")]


def test_device_decisions_on_this_gpu():
    from tests.test_perf import cfg
    from tune_launch.training.perf import decide
    from tune_launch.training.settings import DeviceFacts

    dev = DeviceFacts.probe("cuda")
    plan = decide(cfg(), dev)
    assert dev.name and plan.precision == ("bf16" if dev.bf16 else "fp16")
    assert plan.optimizer == "adamw_torch_fused"
    if dev.bf16:  # Ampere or newer: a varlen kernel exists (flash_attn or torch's own)
        assert plan.attn_implementation in ("flash_attention_2", "tl_varlen"), plan.reasons


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8, reason="needs a CUDA GPU of compute capability 8.0+ (none here)")
def test_torch_varlen_matches_per_document_sdpa():
    import torch.nn.functional as F

    from tune_launch.training.varlen_attn import boundaries, torch_varlen_fn, varlen_attention_forward

    assert torch_varlen_fn() is not None, "this torch has no torch.nn.attention.varlen"
    torch.manual_seed(0)
    lengths = [300, 17, 1024, 5, 702]
    s, h, kv, d = sum(lengths), 32, 4, 64
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.tensor([[i for n in lengths for i in range(n)]], device="cuda")
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=d ** -0.5, position_ids=pos)
    ref = []
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl].repeat_interleave(h // kv, 1),
                                                  v[:, :, sl].repeat_interleave(h // kv, 1), is_causal=True).transpose(1, 2))
        start += n
    ref = torch.cat(ref, dim=1)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    g_out = torch.autograd.grad(out.float().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.float().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert (a.float() - b.float()).abs().max().item() < 5e-2
    cu, longest = boundaries(pos)
    assert cu.tolist() == [0, 300, 317, 1341, 1346, 2048] and longest == 1024


def test_full_finetune_steps_with_the_fast_path(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from bench.throughput import _VocabOnly
    from tests.test_perf import cfg
    from tune_launch.training.distributed import RankInfo
    from tune_launch.training.model import build_model
    from tune_launch.training.packing import pack_best_fit
    from tune_launch.profiles import get_profile
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import MetricsCallback, arguments, build_trainer

    c = cfg(train={"micro_batch_size": 4, "max_steps": 8, "gradient_checkpointing": False, "torch_compile": False},
            optim={"learning_rate": 3e-3, "scheduler": "constant"}, logging={"logging_steps": 1},
            checkpoint={"save_steps": 10**6, "save_final_model": False}, output_dir=str(tmp_path))
    info = RankInfo(device="cuda", profile="single-gpu")
    dev = DeviceFacts.probe("cuda")
    settings = resolve_settings(c, dev, get_profile(info.profile))
    args = TrainingArguments(**{**arguments(c, info, False, settings, dev), "disable_tqdm": True})
    assert args.optim.value == "adamw_torch_fused" and args.bf16
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in torch.randint(5, 60, (12,), generator=g)]
    rows = pack_best_fit([[1, *d, 2] for d in docs], 128, 0) * 8
    metrics = MetricsCallback()
    trainer = build_trainer(c, info, args, build_model(c, _VocabOnly(512), settings, dev), None, Dataset.from_list(rows), None,
                            metrics, settings, dev)
    trainer.train()
    losses = [loss for _, loss in metrics.train_losses]
    assert losses[-1] < losses[0], losses
