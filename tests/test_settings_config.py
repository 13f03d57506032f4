"""Every new setting (issue 18) refuses bad input with one line naming the key, exit 2, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_launch.training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def _base(tmp: Path) -> dict:
    """A valid SFT YAML on a local alpaca file, with an eval split."""
    data = tmp / "rows.jsonl"
    data.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    return {"model": {"name_or_path": "org/model", "lora": {"r": 4}}, "task": "sft",
            "data": {"train": {"path": str(data), "format": "alpaca"}, "eval_fraction": 0.1},
            "output_dir": str(tmp / "out")}


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return cfg


def _write(tmp: Path, cfg: dict) -> Path:
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


# (edits, the message the one line must match)
BAD = {
    "best-without-eval": ([("data.eval_fraction", 0.0), ("eval.load_best_model_at_end", True)],
                          r"eval.load_best_model_at_end: needs evaluation data; add data.eval or data.eval_fraction"),
    "early-stopping-without-eval": ([("data.eval_fraction", 0.0), ("eval.early_stopping", {"patience": 2})],
                                    r"eval.early_stopping: needs evaluation data"),
    "patience-missing": ([("eval.early_stopping", {"threshold": 0.1})], r"missing required key 'eval.early_stopping.patience'"),
    "patience-zero": ([("eval.early_stopping", {"patience": 0})], r"eval.early_stopping.patience: Input should be greater than 0"),
    "threshold-negative": ([("eval.early_stopping", {"patience": 1, "threshold": -1})],
                           r"eval.early_stopping.threshold: Input should be greater than or equal to 0"),
    "metric-unknown": ([("eval.metric_for_best_model", "eval_acuracy")],
                       r"eval.metric_for_best_model: 'eval_acuracy' is not a metric task sft evaluates "
                       r"\(did you mean \"mean_token_accuracy\"\?\); use one of loss, mean_token_accuracy, entropy"),
    "metric-pretrain": ([("task", "pretrain"), ("data.train.format", "text"), ("eval.metric_for_best_model", "mean_token_accuracy")],
                        r"'mean_token_accuracy' is not a metric task pretrain evaluates; use one of loss"),
    "loss-greater": ([("eval.load_best_model_at_end", True), ("eval.greater_is_better", True)],
                     r"eval.greater_is_better: true would keep the checkpoint with the highest loss"),
    "strategies-differ": ([("eval.load_best_model_at_end", True), ("checkpoint.save_strategy", "epoch")],
                          r"eval.eval_strategy: .*one schedule \(checkpoint.save_strategy epoch, eval.eval_strategy steps\)"),
    "save-not-multiple": ([("eval.load_best_model_at_end", True), ("checkpoint.save_steps", 50), ("eval.eval_steps", 20)],
                          r"checkpoint.save_steps: 50 is not a multiple of eval.eval_steps 20"),
    "save-strategy-typo": ([("checkpoint.save_strategy", "epochs")], r"checkpoint.save_strategy: Input should be 'steps' or 'epoch'"),
    "eval-strategy-typo": ([("eval.eval_strategy", "no")], r"eval.eval_strategy: Input should be 'steps' or 'epoch'"),
    "save-steps-with-epoch": ([("checkpoint.save_strategy", "epoch"), ("checkpoint.save_steps", 100)],
                              r"checkpoint.save_steps: saves happen per epoch"),
    "eval-steps-with-epoch": ([("eval.eval_strategy", "epoch"), ("eval.eval_steps", 100)], r"eval.eval_steps: evaluations happen per epoch"),
    "both-widths": ([("model.quantization", {"load_in_4bit": True, "load_in_8bit": True})],
                    r"model.quantization: load_in_4bit and load_in_8bit are both true; pick one"),
    "no-width": ([("model.quantization", {"load_in_4bit": False})], r"model.quantization: neither load_in_4bit nor load_in_8bit"),
    "4bit-key-with-8bit": ([("model.quantization", {"load_in_8bit": True, "quant_type": "nf4"})],
                           r"model.quantization: quant_type is a 4-bit setting; 8-bit LLM.int8 has none"),
    "8bit-key-with-4bit": ([("model.quantization", {"int8_threshold": 4.0})], r"model.quantization: int8_threshold is an 8-bit setting"),
    "8bit-without-lora": ([("model.lora", None), ("model.quantization", {"load_in_8bit": True})],
                          r"model.quantization \(8-bit LoRA\) needs model.lora"),
    "template-positional": ([("data.train.template", "Q: {}\nA: ")], r"data.train.0: template: '\{\}' is positional"),
    "template-bad-format": ([("data.train.template", "Q: {instruction\nA: ")], r"data.train.0: template: not a valid format string"),
    "template-bad-jinja": ([("data.train.template", "{% if input %}{{ input }}")], r"data.train.0: template: Jinja syntax error at line 1"),
    "template-names-completion": ([("data.train.template", "{instruction}\n{output}")],
                                  r"data.train.0: template: names the completion field 'output'; .* drop 'output'"),
    "template-on-chat": ([("data.train.format", "chat"), ("data.train.template", "{instruction}")],
                         r"data.train.0: template: renders instruction rows into a prompt; use format: alpaca"),
    "completion-field-alone": ([("data.train.completion_field", "answer")], r"data.train.0: completion_field: goes with template"),
    "hub-model-id": ([("hub", {"model_id": "just-a-name"})], r"hub.model_id: give the repository as namespace/name"),
    "hub-strategy": ([("hub", {"model_id": "me/model", "strategy": "every_save"})],
                     r"hub.strategy: Input should be 'end', 'checkpoint' or 'all_checkpoints'"),
    "hub-token-key": ([("hub", {"model_id": "me/model", "token": "hf_x"})], r"unknown key 'hub.token'"),
    "hub-nothing-to-push": ([("hub", {"model_id": "me/model"}), ("checkpoint.save_final_model", False)],
                            r"hub: nothing to push at the end"),
    "consolidate-checkpoint-alone": ([("consolidate.checkpoint", "best"), ("eval.load_best_model_at_end", True)],
                                     r"consolidate.checkpoint: chooses what consolidation streams; add consolidate.enabled: true"),
    "consolidate-best-no-metric": ([("consolidate", {"enabled": True, "checkpoint": "best"})],
                                   r"consolidate.checkpoint: best needs a metric"),
    "consolidate-checkpoint-typo": ([("consolidate", {"enabled": True, "checkpoint": "newest"})],
                                    r"consolidate.checkpoint: Input should be 'best' or 'last'"),
    "trainer-unknown": ([("trainer", {"dataloader_pin_memroy": False})],
                        r"trainer.dataloader_pin_memroy: not a field of TRL .* SFTConfig \(did you mean \"dataloader_pin_memory\"\?\)"),
    "trainer-owned": ([("trainer", {"learning_rate": 1e-4})], r"trainer.learning_rate: the YAML sets it with optim.learning_rate"),
    "trainer-controlled": ([("trainer", {"deepspeed": "ds.json"})], r"trainer.deepspeed: set by the profile"),
    "trainer-renamed": ([("trainer", {"group_by_length": True})],
                        r"trainer.group_by_length: not a field of .*renamed or removed\); use trainer.train_sampling_strategy: group_by_length"),
    "trainer-old-eval-name": ([("trainer", {"evaluation_strategy": "steps"})], r"trainer.evaluation_strategy: .*use eval.eval_strategy"),
    "trainer-type": ([("trainer", {"torch_empty_cache_steps": "ten"})], r"trainer.torch_empty_cache_steps: expects an integer or null"),
    "trainer-choice": ([("trainer", {"train_sampling_strategy": "by_length"})],
                       r"trainer.train_sampling_strategy: expects one of random, sequential, group_by_length, batch_rebalance"),
    "trainer-sft-only": ([("task", "pretrain"), ("data.train.format", "text"), ("trainer", {"padding_free": True})],
                         r"trainer.padding_free: an SFTConfig field; task pretrain builds TrainingArguments"),
    "trainer-token": ([("trainer", {"hub_token": "hf_abcdefghijklmnopqrstuvwxyz"})], r"trainer.hub_token: set by HF_TOKEN in the environment"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_setting_is_one_line_naming_the_key(case, tmp_path):
    edits, message = BAD[case]
    cfg = _base(tmp_path)
    for dotted, value in edits:
        _set(cfg, dotted, value)
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in text


def test_every_new_setting_loads_when_valid(tmp_path):
    cfg = _base(tmp_path)
    cfg["model"]["quantization"] = {"load_in_8bit": True, "int8_threshold": 5.0}
    cfg["data"]["train"].update(template="### Instrucción:\n{instruction}\n\n### Respuesta:\n", completion_field="output")
    cfg.update(eval={"eval_strategy": "epoch", "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
                     "early_stopping": {"patience": 3, "threshold": 0.01}},
               checkpoint={"save_strategy": "epoch"}, consolidate={"enabled": True, "checkpoint": "best"},
               hub={"model_id": "me/model", "strategy": "all_checkpoints", "private": False},
               trainer={"torch_empty_cache_steps": 10, "dataloader_pin_memory": False, "train_sampling_strategy": "group_by_length"})
    loaded = load_config(_write(tmp_path, cfg))
    q = loaded.model.quantization
    assert q.bits == 8 and q.int8_threshold == 5.0
    assert loaded.eval.best_metric == "loss" and loaded.eval.higher_is_better is False
    assert loaded.eval.early_stopping.patience == 3 and loaded.consolidate.checkpoint == "best"
    assert loaded.hub.strategy == "all_checkpoints" and loaded.hub.private is False
    assert loaded.trainer == {"torch_empty_cache_steps": 10, "dataloader_pin_memory": False,
                              "train_sampling_strategy": "group_by_length"}


def test_metric_defaults_follow_transformers(tmp_path):
    cfg = _set(_base(tmp_path), "eval.metric_for_best_model", "mean_token_accuracy")
    loaded = load_config(_write(tmp_path, cfg))
    assert loaded.eval.best_metric == "mean_token_accuracy" and loaded.eval.higher_is_better is True
    plain = load_config(_write(tmp_path, _base(tmp_path)))
    assert plain.eval.best_metric is None  # nothing tracked unless asked


def _cli(tmp: Path, cfg: dict, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", *flags, str(_write(tmp, cfg))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**run_env, **(env or {})})


@pytest.mark.parametrize("case", ["template-names-completion", "trainer-unknown", "consolidate-best-no-metric"])
def test_launcher_refuses_bad_setting_before_starting(case, tmp_path):
    edits, message = BAD[case]
    cfg = _base(tmp_path)
    for dotted, value in edits:
        _set(cfg, dotted, value)
    proc = _cli(tmp_path, cfg, "--cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("tune-launch: error: ") and __import__("re").search(message, lines[0])
    assert not (tmp_path / "out").exists()


def test_hub_without_token_is_refused_before_launch(tmp_path):
    cfg = {**_base(tmp_path), "hub": {"model_id": "me/model"}}
    proc = _cli(tmp_path, cfg, "--cpu")
    assert proc.returncode == 2, proc.stderr
    assert "preflight hub: hub.model_id me/model: no HF_TOKEN in the environment" in proc.stderr
    offline = _cli(tmp_path, cfg, "--cpu", env={"HF_TOKEN": "hf_" + "x" * 30, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
    assert "x" * 30 not in offline.stderr
    assert not (tmp_path / "out").exists()


def test_8bit_under_sharding_is_refused_before_launch(tmp_path):
    cfg = _set(_base(tmp_path), "model.quantization", {"load_in_8bit": True})
    for profile in ("fsdp", "zero3"):
        proc = _cli(tmp_path, cfg, "--cpu", "--num-processes", "2", "--profile", profile)
        assert proc.returncode == 2, proc.stderr
        assert f"preflight int8-sharding: 8-bit (LLM.int8) weights cannot be sharded by {profile}" in proc.stderr
    assert not (tmp_path / "out").exists()
