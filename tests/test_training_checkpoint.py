"""Atomic checkpoints, resume discovery, and exact continuation after a real SIGKILL."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import check_ok, launch, report, tiny_config, write_yaml
from tune_launch.training.checkpoint import MARKER, find_resume_checkpoint, inspect_checkpoint, resolve_resume, seal
from tune_launch.training.config import ConfigError
from tune_launch.training.faults import FAULT_ENV


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    staging = root / ".staging" / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    (staging / "sub").mkdir()
    (staging / "sub" / "shard.pt").write_bytes(b"y" * 10)
    final = seal(staging, root / f"checkpoint-{step}", step)
    if not complete:
        (final / MARKER).unlink()
    return final


def test_seal_writes_marker_with_sizes_and_renames(tmp_path):
    final = _fake_checkpoint(tmp_path, 3)
    assert not (tmp_path / ".staging" / "checkpoint-3").exists()
    manifest = json.loads((final / MARKER).read_text())
    assert manifest == {"step": 3, "files": {"model.safetensors": 1000, "sub/shard.pt": 10}}
    assert inspect_checkpoint(final).complete


def test_no_marker_or_truncated_file_is_incomplete(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path, 2)
    no_marker = _fake_checkpoint(tmp_path, 6, complete=False)
    truncated = _fake_checkpoint(tmp_path, 4)
    with open(truncated / "model.safetensors", "r+b") as fh:
        fh.truncate(500)
    assert "no completion marker" in inspect_checkpoint(no_marker).reason
    assert "truncated file model.safetensors (500 of 1000 bytes)" in inspect_checkpoint(truncated).reason
    with caplog.at_level(logging.WARNING, logger="tune_launch"):
        assert find_resume_checkpoint(tmp_path) == good
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text


def test_resume_setting(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # nothing there yet
    ck = _fake_checkpoint(tmp_path, 5)
    assert resolve_resume("auto", tmp_path) == ck
    assert resolve_resume("never", tmp_path) is None
    bad = _fake_checkpoint(tmp_path, 7, complete=False)
    with pytest.raises(ConfigError, match="checkpoint.resume: .*checkpoint-7 is not a complete checkpoint"):
        resolve_resume(str(bad), tmp_path)


@pytest.mark.slow
def test_killed_run_resumes_exactly_and_skips_partial_checkpoints(tiny_model_dir, tmp_path):
    """SIGKILL after step 5 (last checkpoint at 3), plant broken newer checkpoints, resume: the final loss
    equals an uninterrupted run's. Cosine schedule, gradient accumulation 2, attention dropout 0.1 (so the
    restored RNG matters) and a shuffled sampler: everything a resume must restore."""
    model = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.1}}
    sections = dict(tokenizer={"name_or_path": str(tiny_model_dir)},
                    train={"max_steps": 8, "gradient_accumulation_steps": 2, "micro_batch_size": 2},
                    optim={"learning_rate": 5e-3, "scheduler": "cosine", "warmup_steps": 2},
                    checkpoint={"save_steps": 3, "save_total_limit": 3})
    full = write_yaml(tmp_path / "full.yaml", {**tiny_config(tiny_model_dir, tmp_path / "full", **sections), "model": model})
    check_ok(launch(full))
    want = report(tmp_path / "full")

    out = tmp_path / "killed"
    cfg = write_yaml(tmp_path / "killed.yaml", {**tiny_config(tiny_model_dir, out, **sections), "model": model})
    killed = launch(cfg, env={FAULT_ENV: "at=step,step=5,how=kill"})
    assert killed.returncode != 0 and not (out / "run_report.json").exists()
    assert inspect_checkpoint(out / "checkpoint-3").complete and not (out / "checkpoint-6").exists()
    # a newer checkpoint without its marker, and one with a truncated weights file
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-6")
    (out / "checkpoint-6" / MARKER).unlink()
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-4")
    with open(out / "checkpoint-4" / "model.safetensors", "r+b") as fh:
        fh.truncate(100)

    resumed = launch(cfg)
    check_ok(resumed)
    got = report(out)
    assert got["resumed_from"].endswith("checkpoint-3") and got["steps"] == 8
    assert "skipping incomplete checkpoint" in resumed.stderr and "checkpoint-6: no completion marker" in resumed.stderr
    assert "checkpoint-4: truncated file model.safetensors" in resumed.stderr
    assert got["train_losses"][-1] == pytest.approx(want["train_losses"][-1], abs=1e-6)
    assert got["eval_losses"][-1][1] == pytest.approx(want["eval_losses"][-1][1], abs=1e-6)
    assert dict(got["train_losses"])[5] == pytest.approx(dict(want["train_losses"])[5], abs=1e-6)
