"""examples/seeds/: each tutorial our users start from, reproduced as a YAML.

For every seed the test builds what the rank would build (TrainingArguments / SFTConfig from `arguments()`, the
peft LoraConfig, the BitsAndBytesConfig) and checks, field by field, each value the tutorial sets. Where the seed
differs on purpose the expected value comes with the reason. The seeds that fit a CPU then run a few real steps
with the tiny test model substituted by an override (`slow`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, check_ok, launch, report
from tune_launch.training.config import load_config
from tune_launch.training.distributed import RankInfo
from tune_launch.training.settings import DeviceFacts

SEEDS = ROOT / "examples" / "seeds"
GPU = DeviceFacts(kind="cuda", name="NVIDIA A100-SXM4-80GB", bf16=True, memory_gib=79.2)  # one GPU as the rank sees it
DATA = ROOT / "examples" / "data"

# What each tutorial sets, as the rank's arguments must carry it.
TRL_TUTORIAL = {  # TrainingArguments(...) and SFTTrainer(...) of the TRL chapter (Spanish and Chinese editions)
    "num_train_epochs": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
    "optim": "paged_adamw_8bit", "save_steps": 500, "logging_steps": 100, "learning_rate": 2e-4, "weight_decay": 0.01,
    "fp16": True, "bf16": False, "max_grad_norm": 0.3, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
    "eval_strategy": "steps", "eval_steps": 500, "save_total_limit": 2, "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss", "greater_is_better": False, "push_to_hub": False,
    "max_length": 512, "packing": False, "dataset_text_field": "text",
}
TRL_DIFFERS = {
    "report_to": ([], "wandb needs an account and a login; the seed says how to turn it on"),
    "output_dir": ("outputs/seeds/trl-qlora-sft-{lang}", "outputs/ in the repository, not ./results"),
    "completion_only_loss": (True, "the tutorial's formatting_func trains on the prompt too; we mask it (same text)"),
}
DATACAMP_TUTORIAL = {  # model_training_args, SFTTrainer(...), LoraConfig, the 8-bit base
    "per_device_train_batch_size": 4, "optim": "adamw_torch", "logging_steps": 80, "learning_rate": 2e-4,
    "warmup_steps": 0.1, "lr_scheduler_type": "linear", "num_train_epochs": 1, "save_strategy": "epoch",
    "max_length": 1024, "packing": True, "dataset_text_field": "text", "bf16": True,
}
DATACAMP_DIFFERS = {
    "output_dir": ("outputs/seeds/datacamp-lora-8bit", "outputs/ in the repository"),
    "completion_only_loss": (False, "the alpaca 'text' column holds prompt and answer together: nothing to mask"),
}
TRAINER_DOCS_TUTORIAL = {  # TrainingArguments of the Trainer guide, its NEFTune and log-level sections
    "learning_rate": 2e-5, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16, "num_train_epochs": 2,
    "weight_decay": 0.01, "eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True,
    "neftune_noise_alpha": 0.1, "log_level": "warning", "log_level_replica": "error", "log_on_each_node": False,
}
TRAINER_DOCS_DIFFERS = {
    "push_to_hub": (False, "tune-launch pushes itself (hub: section): the final model after consolidation, from the "
                           "launcher, and checkpoints from a snapshot so rotation cannot break an upload"),
    "metric_for_best_model": ("eval_loss", "the guide leaves it to load_best_model_at_end's default, which is the loss"),
}
GPT2_TUTORIAL = {  # the notebook's "alternative one"
    "num_train_epochs": 3, "per_device_train_batch_size": 2, "save_steps": 1000, "save_total_limit": 2,
    "eval_strategy": "steps", "eval_steps": 1000,
}
GPT2_DIFFERS = {
    "output_dir": ("outputs/seeds/gpt2-pretrain-wikitext", "outputs/ in the repository"),
}


def _args(name: str, monkeypatch):
    """The rank's arguments for a seed on one GPU (the GPU's bf16/TF32 checks are the only things faked: no GPU here)."""
    import transformers.training_args as ta
    from transformers import TrainingArguments
    from trl import SFTConfig

    from tune_launch.profiles import get_profile
    from tune_launch.training.settings import resolve_settings
    from tune_launch.training.trainer import arguments

    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)  # TrainingArguments asks the GPU
    monkeypatch.setattr(ta, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(ta, "enable_tf32", lambda on: None)
    cfg = load_config(SEEDS / f"{name}.yaml")
    sft = cfg.task == "sft"
    settings = resolve_settings(cfg, GPU, get_profile("single-gpu"))
    kwargs = arguments(cfg, RankInfo(device="cuda", profile="single-gpu"), sft, settings, GPU)
    return cfg, (SFTConfig if sft else TrainingArguments)(**kwargs)


def _check(args, tutorial: dict, differs: dict, **fmt):
    for field, want in tutorial.items():
        assert getattr(args, field) == want, f"{field}: {getattr(args, field)!r}, the tutorial sets {want!r}"
    for field, (want, why) in differs.items():
        want = want.format(**fmt) if isinstance(want, str) else want
        assert getattr(args, field) == want, f"{field}: {getattr(args, field)!r}, expected {want!r} because {why}"


def test_every_seed_is_tested_and_names_what_it_reproduces():
    seeds = sorted(p.stem for p in SEEDS.glob("*.yaml"))
    assert seeds == ["datacamp-lora-8bit", "gpt2-pretrain-wikitext", "trainer-docs-best-model", "trl-qlora-sft-es",
                     "trl-qlora-sft-zh"]
    for name in seeds:
        first = (SEEDS / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# Reproduces "), name


@pytest.mark.parametrize("lang,header", [("es", ("### Instrucción:", "### Entrada:", "### Respuesta:")),
                                         ("zh", ("### 指令:", "### 输入:", "### 响应:"))])
def test_trl_qlora_seed(lang, header, monkeypatch):
    from tune_launch.training.data import to_sft_row
    from tune_launch.training.model import lora_config, quantization_config

    cfg, args = _args(f"trl-qlora-sft-{lang}", monkeypatch)
    _check(args, TRL_TUTORIAL, TRL_DIFFERS, lang=lang)
    bnb = quantization_config(cfg)  # QLoRA: the tutorial's paged 8-bit AdamW on a 4-bit base
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert str(bnb.bnb_4bit_compute_dtype) == "torch.float16"  # fp16=True in the tutorial
    lora = lora_config(cfg)  # not in this chapter: the usual QLoRA adapters
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (16, 32, 0.05, "CAUSAL_LM")
    # formatting_prompts_func: f"{h1}\n{instruction}\n\n{h2}\n{input_text}\n\n{h3}\n{output}", as prompt + completion
    src = cfg.data.train[0]
    row = json.loads((DATA / f"alpaca-{lang}-sample.jsonl").read_text(encoding="utf-8").splitlines()[0])
    got = to_sft_row(row, src.format, src)
    h1, h2, h3 = header
    assert got["prompt"] + got["completion"] == f"{h1}\n{row['instruction']}\n\n{h2}\n{row['input']}\n\n{h3}\n{row['output']}"
    assert got["completion"] == row["output"]


def test_datacamp_seed(monkeypatch):
    from tune_launch.profiles import get_profile
    from tune_launch.training.model import lora_config, quantization_config, torch_dtype
    from tune_launch.training.settings import resolve_settings

    cfg, args = _args("datacamp-lora-8bit", monkeypatch)
    _check(args, DATACAMP_TUTORIAL, DATACAMP_DIFFERS)
    bnb = quantization_config(cfg)  # prepare_model_for_int8_training: an 8-bit base
    assert bnb.load_in_8bit and not bnb.load_in_4bit and bnb.llm_int8_threshold == 6.0
    lora = lora_config(cfg)  # LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (16, 32, 0.05, "CAUSAL_LM")
    assert lora.target_modules == "all-linear"  # differs: the tutorial leaves peft's per-model default modules
    settings = resolve_settings(cfg, GPU, get_profile("single-gpu"))
    assert str(torch_dtype(settings)) == "torch.bfloat16"  # from_pretrained(..., torch_dtype=torch.bfloat16)
    assert cfg.model.name_or_path == "Salesforce/xgen-7b-8k-base" and cfg.model.trust_remote_code
    src = cfg.data.train[0]
    assert (src.name, src.split, src.format, src.text_field) == ("tatsu-lab/alpaca", "train", "text", "text")


def test_trainer_docs_seed(monkeypatch):
    from tune_launch.training.callbacks import settings_callbacks
    from tune_launch.training.best import EarlyStopping
    from tune_launch.training.hub import HubCheckpointPush

    cfg, args = _args("trainer-docs-best-model", monkeypatch)
    _check(args, TRAINER_DOCS_TUTORIAL, TRAINER_DOCS_DIFFERS)
    # push_to_hub=True, hub_strategy="checkpoint": our hub section, pushed by HubCheckpointPush and the launcher
    assert (cfg.hub.model_id, cfg.hub.strategy) == ("your-username/your-model", "checkpoint")
    callbacks = settings_callbacks(cfg)
    stop = next(c for c in callbacks if isinstance(c, EarlyStopping))
    # differs: the guide's example callback stops after 10 steps (that is train.max_steps); this one stops when the
    # eval loss has not improved for 2 evaluations
    assert stop.early_stopping_patience == 2 and stop.early_stopping_threshold == 0.0
    assert any(isinstance(c, HubCheckpointPush) for c in callbacks)


def test_gpt2_pretraining_seed(monkeypatch):
    cfg, args = _args("gpt2-pretrain-wikitext", monkeypatch)
    _check(args, GPT2_TUTORIAL, GPT2_DIFFERS)
    assert cfg.model.name_or_path == "gpt2" and cfg.tokenizer is None  # the model's own tokenizer, as the notebook
    train, ev = cfg.data.train[0], cfg.data.eval[0]
    assert (train.name, train.subset, train.split) == ("wikitext", "wikitext-2-raw-v1", "train")
    assert (ev.name, ev.subset, ev.split) == ("wikitext", "wikitext-2-raw-v1", "test")
    # differs: packed 1024-token rows with labels instead of padding="max_length" without labels (the notebook's
    # "model did not return a loss"); tests/test_training_data.py checks the packed rows and their labels
    assert cfg.packing and cfg.max_length == 1024


# --------------------------------------------------------------------------- a few real steps on this CPU

def _tiny(model_dir: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.trust_remote_code=false"]


@pytest.mark.slow
def test_datacamp_seed_trains_8bit_lora_with_packing_and_a_checkpoint_per_epoch(tiny_model_dir, tmp_path):
    """The seed as is, with the tiny model and local text: bf16 becomes fp32 (a CPU) and max_length 128."""
    out = tmp_path / "out"
    proc = launch(SEEDS / "datacamp-lora-8bit.yaml", *_tiny(tiny_model_dir), f"output_dir={out}",
                  f"data.train=[{{path: {DATA / 'corpus-sample.jsonl'}, format: text}}]", "max_length=128",
                  "train.precision=fp32", "model.dtype=float32")
    check_ok(proc)
    r = report(out)
    assert "Int8Params" in r["ranks"][0]["param_types"]  # the base really is 8-bit
    # adapters only: r 16 on every linear layer of the 2 tiny blocks (q, o 32->32; k, v 32->16; gate, up, down 32<->64)
    assert r["trainable_params"] == 2 * 16 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{r['steps']}"]  # one epoch, one save at its end
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_trl_seed_trains_with_its_template_and_keeps_the_best(tiny_model_dir, tmp_path):
    """QLoRA needs CUDA (4-bit bitsandbytes): on this CPU the seed runs as LoRA in fp32, evaluating every 2 steps."""
    out = tmp_path / "out"
    proc = launch(SEEDS / "trl-qlora-sft-es.yaml", *_tiny(tiny_model_dir), f"output_dir={out}", "model.quantization=null",
                  "train.precision=fp32", "optim.optimizer=adamw_torch", "train.max_steps=4", "eval.eval_steps=2",
                  "checkpoint.save_steps=2", "train.gradient_accumulation_steps=1")
    check_ok(proc)
    r = report(out)
    assert r["task"] == "sft" and r["steps"] == 4 and sorted(dict(r["eval_losses"])) == [2, 4]
    assert r["best"]["metric"] == "eval_loss" and r["best"]["loaded_at_end"]
    assert len(list(out.glob("checkpoint-*"))) <= 2  # save_total_limit 2, the best among them


@pytest.mark.slow
def test_trainer_docs_seed_runs_and_pushes_checkpoints_and_the_final_model(tiny_model_dir, tmp_path):
    """Two epochs with per-epoch eval/save, best model, early stopping, NEFTune; the hub calls are recorded at the
    upload edge (TUNE_LAUNCH_TEST_HUB_LOG) and the token never appears in any output."""
    out, calls = tmp_path / "out", tmp_path / "hub.jsonl"
    token = "hf_" + "T" * 34
    proc = launch(SEEDS / "trainer-docs-best-model.yaml", *_tiny(tiny_model_dir), f"output_dir={out}",
                  env={"HF_TOKEN": token, "TUNE_LAUNCH_TEST_HUB_LOG": str(calls)})
    check_ok(proc)
    r = report(out)
    assert r["steps"] == 4 and r["best"]["loaded_at_end"]  # 18 training rows / 16 per batch = 2 steps per epoch
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    uploads = [c for c in recorded if c["op"] == "upload_folder"]
    assert all(c["token_given"] and c["repo_id"] == "your-username/your-model" for c in recorded)
    assert all(c["private"] is True for c in recorded if c["op"] == "create_repo")
    assert [u["path_in_repo"] for u in uploads] == ["last-checkpoint", "last-checkpoint", None]  # per epoch, then final
    assert uploads[0]["delete_patterns"] == ["*"] and "trainer_state.json" in uploads[0]["files"]
    assert uploads[-1]["folder"] == str(out / "final") and "model.safetensors" in uploads[-1]["files"]
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert token not in proc.stdout + proc.stderr + logs
    assert not (out / ".hub-snapshots").exists()


@pytest.mark.slow
def test_gpt2_seed_pretrains_with_packed_labelled_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    corpus = DATA / "corpus-sample.jsonl"
    proc = launch(SEEDS / "gpt2-pretrain-wikitext.yaml", *_tiny(tiny_model_dir), f"output_dir={out}",
                  f"data.train=[{{path: {corpus}}}]", f"data.eval=[{{path: {corpus}}}]", "max_length=64",
                  "train.max_steps=6", "eval.eval_steps=2", "checkpoint.save_steps=2")
    check_ok(proc)
    r = report(out)
    assert r["steps"] == 6 and sorted(dict(r["eval_losses"])) == [2, 4, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2
    assert "did not return a loss" not in proc.stderr
    assert os.path.isfile(out / "final" / "model.safetensors")
