"""The data phase in real runs: two gloo ranks prepare once, a failing preparer stops its waiting peer at once,
and a streaming run killed mid-epoch resumes with the uninterrupted run's losses (2 processes each)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import check_ok, launch, report, write_yaml
from tune_launch.training.faults import FAULT_ENV

pytestmark = pytest.mark.slow
MODEL = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                    "attention_dropout": 0.1}}


def corpus(path, n=800, bad_line=None):
    from tune_launch.training.synthetic import pretrain_texts

    rows = [json.dumps(r) for r in pretrain_texts(n, 3)]
    if bad_line is not None:
        rows[bad_line - 1] = json.dumps({"body": "no text here"})
    path.write_text("\n".join(rows) + "\n")
    return path


def run_yaml(tmp_path, name, data, **sections):
    cfg = {"model": MODEL, "tokenizer": {"train_vocab_size": 300}, "task": "pretrain", "data": data, "max_length": 64,
           "optim": {"learning_rate": 5e-3, "scheduler": "cosine", "warmup_steps": 2},
           "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 8, "precision": "fp32",
                     "gradient_checkpointing": False},
           "logging": {"logging_steps": 1, "log_level_replica": "info"}, "eval": {"eval_steps": 1000},
           "checkpoint": {"save_steps": 3, "save_total_limit": 5}, "output_dir": str(tmp_path / name), "seed": 0}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return write_yaml(tmp_path / f"{name}.yaml", cfg)


def lines(text: str, rank: int, pattern: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"rank{rank}]" in ln and re.search(pattern, ln)]


def test_two_ranks_prepare_once_and_a_second_run_only_maps_the_cache(tmp_path):
    data = {"train": {"path": str(corpus(tmp_path / "c.jsonl"))}, "eval_fraction": 0.05,
            "cache_dir": str(tmp_path / "cache")}
    first = launch(run_yaml(tmp_path, "a", data), processes=2, profile="ddp")
    check_ok(first)
    text = first.stderr + first.stdout
    assert len(lines(text, 0, "data cache miss")) == 1 and len(lines(text, 0, "tokenizer trained on")) == 1
    assert lines(text, 1, r"data: rank 0 \(node 0\) prepares the data") and lines(text, 1, "data: ready after")
    assert not lines(text, 1, "data cache|tokenizer trained")  # rank 1 never read, tokenized or wrote the data
    assert len(list((tmp_path / "cache").glob("pretrain-*"))) == 1 and report(tmp_path / "a")["world_size"] == 2

    second = launch(run_yaml(tmp_path, "b", data), processes=2, profile="ddp")  # another output_dir, same data
    check_ok(second)
    text = second.stderr + second.stdout
    assert len(lines(text, 0, "data cache hit")) == 1 and not re.search("data cache miss|tokenizer trained", text)
    assert report(tmp_path / "b")["train_losses"][0] == report(tmp_path / "a")["train_losses"][0]


def test_a_failing_preparer_stops_the_waiting_rank_with_its_reason(tmp_path):
    bad = corpus(tmp_path / "bad.jsonl", bad_line=7)
    proc = launch(run_yaml(tmp_path, "bad", {"train": {"path": str(bad)}, "cache_dir": str(tmp_path / "cache")}),
                  processes=2, profile="ddp", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("tune-launch: error:")]
    assert len(errors) == 1 and f"{bad}: line 7: no field 'text' (fields: body)" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(("pretrain-", ".build"))]


def test_streaming_killed_mid_epoch_resumes_exactly(tmp_path):
    """Per-rank stream positions in the checkpoint: killed after step 5 (checkpoint at 3, mid-round and
    mid-epoch), resumed, the losses equal an uninterrupted run's; nothing before the checkpoint is read again."""
    data = {"train": {"path": str(corpus(tmp_path / "c.jsonl", n=600))}, "streaming": True, "stream_buffer_rows": 3,
            "cache_dir": str(tmp_path / "cache")}
    full = launch(run_yaml(tmp_path, "full", data), processes=2, profile="ddp")
    check_ok(full)
    want = report(tmp_path / "full")

    cfg = run_yaml(tmp_path, "killed", data)
    killed = launch(cfg, processes=2, profile="ddp", env={FAULT_ENV: "at=step,step=5,how=kill"})
    out = tmp_path / "killed"
    assert killed.returncode != 0 and not (out / "run_report.json").exists()
    positions = sorted(p.name for p in (out / "checkpoint-3" / "data_position").iterdir())
    assert positions == ["rank0.json", "rank0.npz", "rank1.json", "rank1.npz"]
    meta = json.loads((out / "checkpoint-3" / "data_position" / "rank1.json").read_text())
    assert meta["consumed"] == 3 * 2 * 2 and meta["world_size"] == 2

    resumed = launch(cfg, processes=2, profile="ddp")
    check_ok(resumed)
    got = report(out)
    assert got["resumed_from"].endswith("checkpoint-3") and got["steps"] == 8
    assert lines(resumed.stderr, 0, "data.streaming: rank 0 resumes at row 12")
    assert got["train_losses"][-1] == pytest.approx(want["train_losses"][-1], abs=1e-6)
    assert dict(got["train_losses"])[4] == pytest.approx(dict(want["train_losses"])[4], abs=1e-6)
