"""Shared fixtures: a tiny saved Llama + tokenizer (built here, no hub), YAML writing, running the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def _offline_flags_restored(monkeypatch):
    """`tune-launch prepare` run in-process sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE in os.environ (its own
    process's, as it must before datasets is imported); no test may hand them to the next test's launches."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)  # undone in reverse at teardown: removed again whatever the test set


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Prepared data goes to a cache of this test session (HF_DATASETS_CACHE), never to the user's."""
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets-cache"))
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (seed 0) and a tokenizer trained on the repo's synthetic text, saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune_launch.training.synthetic import pretrain_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = train_tokenizer([r["text"] for r in pretrain_texts(200, 0)], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, **TINY_LLAMA))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_config(model_dir: Path, output_dir: Path, **sections) -> dict:
    """A small pre-training YAML on the saved tiny model: constant LR so runs can be compared step by step."""
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "task": "pretrain",
        "data": {"generate": {"kind": "pretrain", "train_samples": 300, "eval_samples": 30, "seed": 0}},
        "max_length": 64,
        "packing": True,
        "optim": {"learning_rate": 1.0e-2, "scheduler": "constant", "weight_decay": 0.0},
        "train": {"micro_batch_size": 4, "max_steps": 6, "precision": "fp32", "gradient_checkpointing": False},
        "logging": {"logging_steps": 1},
        "eval": {"eval_steps": 1000, "per_device_batch_size": 2},
        "checkpoint": {"save_steps": 2, "save_total_limit": 5},
        "output_dir": str(output_dir),
        "seed": 0,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch(config: Path, *overrides: str, profile: str | None = None, processes: int = 1,
           env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`tune-launch --cpu [--num-processes N --profile P] config overrides` as a real subprocess."""
    argv = [sys.executable, "-m", "tune_launch.launch.cli", "--cpu"]
    if processes > 1:
        argv += ["--num-processes", str(processes)]
    if profile:
        argv += ["--profile", profile]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([*argv, str(config), *overrides], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def report(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "run_report.json").read_text())


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
