"""Resuming into an output_dir that holds another kind of run's checkpoint: one line naming what differs."""

from __future__ import annotations

import json
import re

import pytest

from conftest import check_ok, launch, tiny_config, write_yaml


def test_fingerprint_compare_names_the_first_difference_and_what_to_do():
    from tune_launch.profiles import get_profile
    from tune_launch.training.checkpoint import incompatibility

    base = {"task": "pretrain", "layout": "fsdp", "lora": None, "total_params": 10, "trainable_params": 10}
    assert incompatibility(base, dict(base)) is None
    lora = incompatibility(base, {**base, "lora": {"r": 4, "target_modules": ["q_proj"]}})
    assert lora == ("the checkpoint holds full weights, this run trains LoRA adapters (r=4): they do not load into each "
                    "other; resume with the same model.lora, or merge or consolidate it and start a new run from that")
    layout = incompatibility(base, {**base, "layout": "deepspeed-zero3"}, where="out/checkpoint-6")
    assert layout == ("out/checkpoint-6 holds FSDP shards, which DeepSpeed ZeRO-3 cannot load: resume with --profile fsdp "
                      "or fsdp-offload, or `tune-launch consolidate` it and start a new run from that")
    # the batch layout is recorded but never refused: a resume may change it (tests/test_reshard.py)
    batch = {"world_size": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1}
    assert incompatibility({**base, **batch}, {**base, "world_size": 1, "micro_batch_size": 8, "gradient_accumulation_steps": 2}) is None
    assert incompatibility({"task": "pretrain"}, base) is None  # fields an older marker lacks are not compared
    assert [get_profile(p).layout_family for p in ("fsdp-offload", "zero3-offload", "zero2", "ddp", "cpu")] == \
        ["fsdp", "deepspeed-zero3", "deepspeed-zero2", "plain", "plain"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_lora_run_refuses_a_full_fine_tune_checkpoint(tiny_model_dir, tmp_path, processes):
    """One process (accelerate's simple launcher) and two (torchrun, ddp): either way the launcher ends with the
    rank's refusal as its one-line verdict, exit 2, and neither accelerate's nor torchrun's traceback."""
    profile = "ddp" if processes > 1 else None
    out = tmp_path / "run"
    full = tiny_config(tiny_model_dir, out, train={"max_steps": 2}, checkpoint={"save_steps": 2})
    check_ok(launch(write_yaml(tmp_path / "full.yaml", full), profile=profile, processes=processes))
    marker = json.loads((out / "checkpoint-2" / "tune_launch_complete.json").read_text())
    assert marker["fingerprint"]["lora"] is None and marker["fingerprint"]["layout"] == "plain"
    assert marker["fingerprint"]["trainable_params"] == marker["fingerprint"]["total_params"] > 0
    assert marker["fingerprint"]["world_size"] == processes and marker["fingerprint"]["gradient_accumulation_steps"] == 1

    lora = {**full, "model": {**full["model"], "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train": {**full["train"], "max_steps": 4}}
    proc = launch(write_yaml(tmp_path / "lora.yaml", lora), profile=profile, processes=processes)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # the launcher's own one-line verdict names the refusal
    assert re.match(r"tune-launch: error: rank [01] \(node 0\) failed: ConfigError: checkpoint\.resume: ", last), last
    assert ("checkpoint.resume: run/checkpoint-2 holds full weights, this run trains LoRA adapters (r=4): they do not "
            "load into each other; resume with the same model.lora, or merge or consolidate it and start a new run from "
            "that (or start over: a new output_dir, or checkpoint.resume: never); every rank had exited") in last, last
    assert "Traceback" not in proc.stderr  # accelerate's own report of the rank's exit is held back
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()  # nothing lost, nothing written

    # the way out the message gives: start over in the same folder
    check_ok(launch(write_yaml(tmp_path / "lora-new.yaml", {**lora, "checkpoint": {**lora["checkpoint"], "resume": "never"}}),
                    profile=profile, processes=processes))
    marker = json.loads((out / "checkpoint-4" / "tune_launch_complete.json").read_text())
    assert marker["fingerprint"]["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
