"""Best checkpoint and early stopping: kept from rotation, reloaded for sharded profiles, resumed from the newest."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import check_ok, launch, report, tiny_config, write_yaml
from tune_launch.training.best import EarlyStopping, best_model_arguments, best_summary, point_at_sealed
from tune_launch.training.checkpoint import _rotate, find_resume_checkpoint, seal
from tune_launch.training.schema import TrainingConfig


def _checkpoint(root: Path, step: int) -> Path:
    staging = root / ".staging" / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"w" * step)
    return seal(staging, root / f"checkpoint-{step}", step)


def _names(root: Path) -> list[str]:
    return sorted((p.name for p in root.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.mark.parametrize("limit,best,kept", [
    (1, None, ["checkpoint-8"]),
    (1, "checkpoint-2", ["checkpoint-2", "checkpoint-8"]),  # the newest stays for resume, the best besides
    (2, "checkpoint-2", ["checkpoint-2", "checkpoint-8"]),  # as transformers: the best counts within the limit
    (3, "checkpoint-2", ["checkpoint-2", "checkpoint-6", "checkpoint-8"]),
    (2, "checkpoint-8", ["checkpoint-6", "checkpoint-8"]),
    (2, "checkpoint-6", ["checkpoint-6", "checkpoint-8"]),
])
def test_rotation_never_deletes_the_best_checkpoint(tmp_path, limit, best, kept):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    _rotate(tmp_path, limit, str(tmp_path / best) if best else None)
    assert _names(tmp_path) == kept
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-8"  # resume: auto takes the newest, not the best


def test_point_at_sealed_records_the_final_folder(tmp_path):
    """transformers records the best checkpoint under the folder it saved into: our staging folder, renamed away."""
    staging = tmp_path / ".staging" / "checkpoint-6"
    staging.mkdir(parents=True)
    (staging / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": str(staging), "global_step": 6}))
    (tmp_path / "checkpoint-2").mkdir()
    state = SimpleNamespace(best_global_step=2, global_step=6, best_model_checkpoint=str(tmp_path / ".staging" / "checkpoint-2"))
    point_at_sealed(SimpleNamespace(state=state), tmp_path, staging)
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert json.loads((staging / "trainer_state.json").read_text())["best_model_checkpoint"] == str(tmp_path / "checkpoint-2")
    state.best_global_step = 6  # a new best: the folder being sealed now
    point_at_sealed(SimpleNamespace(state=state), tmp_path, None)
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-6")


def test_early_stopping_continues_its_count_after_resume():
    es = EarlyStopping(early_stopping_patience=3)
    args = SimpleNamespace(load_best_model_at_end=True, metric_for_best_model="eval_loss", eval_strategy="steps")
    saved = {"EarlyStopping": {"args": {}, "attributes": {"early_stopping_patience_counter": 2}}}
    es.on_train_begin(args, SimpleNamespace(stateful_callbacks=saved, global_step=40), SimpleNamespace())
    assert es.early_stopping_patience_counter == 2
    fresh = EarlyStopping(early_stopping_patience=3)
    fresh.on_train_begin(args, SimpleNamespace(stateful_callbacks=saved, global_step=0), SimpleNamespace())
    assert fresh.early_stopping_patience_counter == 0


def test_best_model_arguments_and_summary():
    base = {"model": {"name_or_path": "org/m"}, "data": {"generate": {"kind": "pretrain"}}}
    cfg = TrainingConfig.model_validate({**base, "eval": {"load_best_model_at_end": True}})
    assert best_model_arguments(cfg) == {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
                                         "greater_is_better": False}
    assert best_model_arguments(TrainingConfig.model_validate(base)) == {"load_best_model_at_end": False}
    lines = best_summary({"best": {"metric": "eval_loss", "value": 1.23456, "step": 40, "checkpoint": "/o/checkpoint-40",
                                   "loaded_at_end": True}, "early_stopped": {"step": 60, "patience": 2}})
    assert lines == ["  best: eval_loss 1.2346 at step 40 (/o/checkpoint-40); the final model is this one",
                     "  stopped early at step 60: no improvement for 2 evaluation(s)"]


def test_consolidation_takes_the_best_or_the_newest(tmp_path):
    from tune_launch.launch.consolidate import checkpoint_to_consolidate

    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    base = {"model": {"name_or_path": "org/m"}, "data": {"generate": {"kind": "pretrain"}}, "output_dir": str(tmp_path),
            "eval": {"load_best_model_at_end": True}}
    best = TrainingConfig.model_validate({**base, "consolidate": {"enabled": True, "checkpoint": "best"}})
    last = TrainingConfig.model_validate({**base, "consolidate": {"enabled": True}})
    run = {"best": {"checkpoint": str(tmp_path / "checkpoint-2"), "metric": "eval_loss", "value": 1.5, "step": 2}}
    assert checkpoint_to_consolidate(best, run) == (tmp_path / "checkpoint-2", "the best checkpoint (eval_loss 1.5000 at step 2)")
    assert checkpoint_to_consolidate(last, run)[0] == tmp_path / "checkpoint-6"
    folder, why = checkpoint_to_consolidate(best, {"best": None})
    assert folder == tmp_path / "checkpoint-6" and "no best checkpoint was recorded" in why


# --------------------------------------------------------------------------- real runs

def _plateau_data(tmp: Path) -> tuple[str, str]:
    """Training text from the repo's generator; eval text in characters the training text never has, so every
    optimizer step makes the eval loss worse: the best checkpoint is the first one (a plateau planted in the data)."""
    from tune_launch.training.synthetic import pretrain_texts

    rng = random.Random(0)
    train, ev = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pretrain_texts(200, 0)))
    words = lambda: " ".join("".join(rng.choice("QXZJKVWY0123456789") for _ in range(5)) for _ in range(12))  # noqa: E731
    ev.write_text("".join(json.dumps({"text": words()}) + "\n" for _ in range(16)))
    return str(train), str(ev)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["fsdp", "zero3"])
def test_best_model_and_early_stopping_on_a_sharded_profile(profile, tiny_model_dir, tmp_path):
    """2 gloo ranks: the run stops early on the plateau, the best checkpoint survives rotation (save_total_limit 1),
    the final model is the best checkpoint's weights (not the last step's), consolidation takes the best one; a
    resumed run continues from the newest checkpoint and still keeps and reloads the best."""
    from tune_launch.launch.consolidation import consolidate_checkpoint

    train, ev = _plateau_data(tmp_path)
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, out, train={"max_steps": 30},
                      eval={"eval_steps": 2, "load_best_model_at_end": True, "early_stopping": {"patience": 2}},
                      checkpoint={"save_steps": 2, "save_total_limit": 1},
                      consolidate={"enabled": True, "checkpoint": "best", "dtype": "fp32"})
    cfg["data"] = {"train": [{"path": train}], "eval": [{"path": ev}]}
    path = write_yaml(tmp_path / "best.yaml", cfg)
    proc = launch(path, profile=profile, processes=2)
    check_ok(proc)
    r = report(out)
    assert r["world_size"] == 2 and r["profile"] == profile and r["is_fsdp" if profile == "fsdp" else "is_deepspeed"]
    evals = dict(r["eval_losses"])
    assert sorted(evals) == [2, 4, 6] and evals[2] < evals[4] < evals[6], evals  # the plateau
    assert r["steps"] == 6 and r["early_stopped"] == {"step": 6, "patience": 2, "threshold": 0.0}
    assert r["best"]["step"] == 2 and r["best"]["value"] == pytest.approx(evals[2]) and r["best"]["loaded_at_end"]
    assert r["best"]["checkpoint"] == str((out / "checkpoint-2").resolve())
    assert _names(out) == ["checkpoint-2", "checkpoint-6"]  # newest for resume, best kept; checkpoint-4 rotated out
    assert "best: eval_loss" in proc.stdout and "stopped early at step 6" in proc.stdout
    assert "consolidating the best checkpoint (eval_loss" in proc.stderr and "Traceback" not in proc.stderr

    final, best = _weights(out / "final"), _weights(out / "consolidated")
    consolidate_checkpoint(out / "checkpoint-6", tmp_path / "last", dtype="fp32", progress=None)
    assert _same(final, best) and not _same(final, _weights(tmp_path / "last"))
    if profile != "fsdp":
        return

    resumed = launch(path, "train.max_steps=10", "eval.early_stopping.patience=10", profile=profile, processes=2)
    check_ok(resumed)
    r2 = report(out)
    assert r2["resumed_from"].endswith("checkpoint-6") and r2["steps"] == 10 and r2["early_stopped"] is None
    assert r2["best"]["step"] == 2 and r2["best"]["loaded_at_end"]
    assert _names(out) == ["checkpoint-2", "checkpoint-10"]
    assert _same(_weights(out / "final"), best)
