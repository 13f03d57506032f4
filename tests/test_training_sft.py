"""The embedded defaults and SFT/LoRA through TRL, run for real on one CPU process."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, check_ok, launch, report, tiny_config, write_yaml

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("example", ["pretrain-tiny", "sft-tiny"])
def test_embedded_default_learns(example, tmp_path):
    """The README's command: eval loss at least halves, and the summary names steps, tokens/s, losses, checkpoint."""
    proc = launch(ROOT / "examples" / f"{example}.yaml", f"output_dir={tmp_path / 'out'}", "logging.report_to=tensorboard")
    check_ok(proc)
    r = report(tmp_path / "out")
    _assert_tensorboard_has_losses(tmp_path / "out" / "runs")
    first, last = r["eval_losses"][0][1], r["eval_losses"][-1][1]
    assert r["eval_losses"][0][0] == 0 and last <= first / 2, r["eval_losses"]
    assert "done: " in proc.stdout and "tokens/s" in proc.stdout and "eval loss" in proc.stdout
    assert f"checkpoint: {tmp_path / 'out'}/checkpoint-" in proc.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def _assert_tensorboard_has_losses(runs):
    """report_to: tensorboard writes the train and eval losses as transformers does (one events file, rank 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(runs.glob("*/events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags, tags
    assert len(acc.Scalars("train/loss")) >= 2


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_lora_sft_trains_adapters_on_completions_and_merges(fmt, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", task="sft", max_length=512,
                      data={"generate": {"kind": fmt, "train_samples": 64, "eval_samples": 8, "seed": 0}},
                      train={"max_steps": 4, "neftune_noise_alpha": 5.0},
                      checkpoint={"save_steps": 4})
    cfg["model"] = {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "merge_at_end": True}}
    proc = launch(write_yaml(tmp_path / "sft.yaml", cfg))
    check_ok(proc)
    r = report(tmp_path / "out")
    assert r["task"] == "sft" and r["steps"] == 4
    assert 0 < r["trainable_params"] < r["ranks"][0]["total_params"] / 5  # only adapters train
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    merged = tmp_path / "out" / "final"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
    shutil.rmtree(tmp_path / "out")


def test_completion_only_loss_masks_the_prompt(tiny_model_dir, tmp_path):
    """A batch from TRL's SFTTrainer for an alpaca row: labels only on the response and EOS."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tune_launch.training.data import alpaca_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = Dataset.from_list([{"prompt": alpaca_prompt("add the two numbers .", "one two"), "completion": "three"}])
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=512, completion_only_loss=True,
                     per_device_train_batch_size=1)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=ds,
                         processing_class=tok)
    labels = next(iter(trainer.get_train_dataloader()))["labels"][0].tolist()
    answer = tok("three", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [x for x in labels if x != -100] == answer and labels[-len(answer):] == answer
