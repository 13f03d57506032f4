"""LoRA and 4-bit NF4 QLoRA through the training path, on a CUDA GPU: falling loss, non-zero adapter gradients,
merged adapters. Skipped (with the reason) where torch sees no GPU, as in CI; run them on the GPU machine
with `python3 -m pytest -m gpu tests` (docs/performance.md has the recipe)."""

from __future__ import annotations


import pytest
import torch


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (none here: CI and CPU machines skip this)")]

SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL)).to(torch.bfloat16).save_pretrained(out)
    return out


def _train(model_dir, tmp_path, quantized: bool, steps: int = 12):
    """Build config -> model -> Trainer as training/run.py does; repeat a few documents so the loss must fall."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from bench.throughput import _VocabOnly
    from tune_launch.training.config import validate_config
    from tune_launch.training.distributed import RankInfo
    from tune_launch.training.model import build_model, prepare_for_kbit
    from tune_launch.training.packing import pack_best_fit
    from tune_launch.profiles import get_profile
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import MetricsCallback, arguments, build_trainer

    model = {"name_or_path": str(model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    if quantized:
        model["quantization"] = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    cfg = validate_config({
        "model": model, "data": {"train": {"path": "x.jsonl"}}, "max_length": 128, "packing": True,
        "optim": {"learning_rate": 5e-3, "scheduler": "constant"},
        "train": {"micro_batch_size": 4, "max_steps": steps, "gradient_checkpointing": False},
        "logging": {"logging_steps": 1}, "checkpoint": {"save_steps": 10**6, "save_final_model": False},
        "output_dir": str(tmp_path / "out"), "seed": 0}, "test")
    info = RankInfo(device="cuda", profile="single-gpu")
    dev = DeviceFacts.probe("cuda")
    settings = resolve_settings(cfg, dev, get_profile(info.profile))
    args = TrainingArguments(**{**arguments(cfg, info, False, settings, dev), "disable_tqdm": True})
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in torch.randint(20, 120, (16,), generator=g)]
    rows = pack_best_fit([[1, *d, 2] for d in docs], 128, pad_id=0)
    ds = Dataset.from_list(rows * 8)
    net = prepare_for_kbit(build_model(cfg, _VocabOnly(512), settings, dev), cfg, settings)
    metrics = MetricsCallback()
    grads: dict[str, float] = {}

    from transformers import TrainerCallback

    class GradProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if not grads:
                for n, p in model.named_parameters():
                    if "lora_" in n and p.grad is not None:
                        grads[n] = float(p.grad.float().abs().sum())

    trainer = build_trainer(cfg, info, args, net, None, ds, None, metrics, settings, dev)
    trainer.add_callback(GradProbe())
    trainer.train()
    return trainer, [loss for _, loss in metrics.train_losses], grads


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora-nf4"])
def test_adapters_train_and_merge(small_model_dir, tmp_path, quantized):
    trainer, losses, grads = _train(small_model_dir, tmp_path, quantized)
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert grads and all(v > 0 for v in grads.values()), "adapter gradients must be non-zero"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if quantized:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "base weights must be 4-bit"
    ids = torch.randint(3, 512, (1, 32), device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits.float()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    tol = 0.5 if quantized else 0.05  # merging into NF4 weights re-quantizes them
    assert (before - after).abs().max().item() < tol
    merged.save_pretrained(str(tmp_path / "merged"))
    assert any((tmp_path / "merged").glob("*.safetensors"))
