"""Resuming into an output_dir that holds another kind of run's checkpoint: one line naming what differs."""

from __future__ import annotations

import json
import re

import pytest

from conftest import check_ok, launch, tiny_config, write_yaml


def test_fingerprint_compare_names_the_first_difference():
    from tune_launch.profiles import get_profile
    from tune_launch.training.checkpoint import incompatibility

    base = {"task": "pretrain", "layout": "fsdp", "lora": None, "total_params": 10, "trainable_params": 10}
    assert incompatibility(base, dict(base)) is None
    assert incompatibility(base, {**base, "lora": {"r": 4, "target_modules": ["q_proj"]}}).startswith("lora: checkpoint None")
    assert incompatibility({**base, "world_size": 2}, {**base, "world_size": 4}) == "world_size: checkpoint 2, this run 4"
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

    lora = {**full, "model": {**full["model"], "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train": {**full["train"], "max_steps": 4}}
    proc = launch(write_yaml(tmp_path / "lora.yaml", lora), profile=profile, processes=processes)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # the launcher's own one-line verdict names the refusal
    assert re.match(r"tune-launch: error: rank [01] \(node 0\) failed: ConfigError: checkpoint\.resume: ", last), last
    assert "checkpoint-2 was written by an incompatible run (lora: checkpoint None, this run {'r': 4" in last
    assert "use a new output_dir, or set checkpoint.resume: never" in last
    assert "Traceback" not in proc.stderr  # accelerate's own report of the rank's exit is held back
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()  # nothing lost, nothing written

    # the way out the message gives: start over in the same folder
    check_ok(launch(write_yaml(tmp_path / "lora-new.yaml", {**lora, "checkpoint": {**lora["checkpoint"], "resume": "never"}}),
                    profile=profile, processes=processes))
    marker = json.loads((out / "checkpoint-4" / "tune_launch_complete.json").read_text())
    assert marker["fingerprint"]["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
