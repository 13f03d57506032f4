"""CPU rehearsals with 2 real gloo processes: what really ran, same losses as one process, checkpoint + resume.

Each profile runs twice through `tune-launch --cpu --num-processes 2 --profile P`: 4 steps (checkpoints at 2
and 4), then 6 steps, which must resume from checkpoint-4. With a constant learning rate, steps 1-4 of the
first run and 5-6 of the resumed one must match one process with the same global batch (8) step by step.
Tolerance: 1e-4 absolute on losses around 5 (measured differences are below 1e-6; ZeRO-3 partitions its
fp32 master weights differently, which stays far inside the tolerance).
"""

from __future__ import annotations

import re

import pytest

from conftest import check_ok, launch, report, tiny_config, write_yaml

pytestmark = pytest.mark.slow
TOL = 1e-4
PROFILES = ["ddp", "fsdp", "zero2", "zero3", "zero3-offload"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict:
    """One process with the global batches of 2 ranks: train 8 (= 2 x 4), eval 4 (= 2 x 2), 6 steps.

    transformers 5 averages eval loss over the tokens of each global eval batch, so the eval batch must
    match too (30 eval documents pack into 32 rows with best-fit packing: 8 full global batches, no padding
    duplicates).
    """
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_yaml(tmp / "ref.yaml", tiny_config(tiny_model_dir, tmp / "out", train={"micro_batch_size": 8},
                                                   eval={"per_device_batch_size": 4}))
    proc = launch(cfg)
    check_ok(proc)
    r = report(tmp / "out")
    assert r["world_size"] == 1 and r["distributed_type"] == "NO"
    return r


def _run_profile(profile: str, tiny_model_dir, tmp) -> tuple[dict, dict, str]:
    cfg = write_yaml(tmp / f"{profile}.yaml", tiny_config(tiny_model_dir, tmp / "out"))
    first = launch(cfg, "train.max_steps=4", profile=profile, processes=2)
    check_ok(first)
    r1 = report(tmp / "out")
    second = launch(cfg, "train.max_steps=6", profile=profile, processes=2)
    check_ok(second)
    return r1, report(tmp / "out"), first.stderr + second.stderr


def _losses(r: dict) -> dict[int, float]:
    return {step: loss for step, loss in r["train_losses"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_rehearsal_really_distributes_and_matches_one_process(profile, tiny_model_dir, tmp_path, reference):
    r1, r2, stderr = _run_profile(profile, tiny_model_dir, tmp_path)

    for r in (r1, r2):
        assert r["world_size"] == 2 and r["num_processes"] == 2 and r["backend"] == "gloo"
        assert r["profile"] == profile and len(r["ranks"]) == 2
    total = r1["ranks"][0]["total_params"]
    if profile == "ddp":
        assert r1["distributed_type"] == "MULTI_CPU" and r1["wrapper"] == "DistributedDataParallel"
        assert all(k["local_params"] == total for k in r1["ranks"])
    elif profile == "fsdp":
        assert r1["distributed_type"] == "FSDP" and r1["is_fsdp"] and r1["model_class"].startswith("FSDP")
        assert all(k["param_types"] == ["DTensor"] for k in r1["ranks"])
        assert sum(k["local_params"] for k in r1["ranks"]) == total
        assert all(abs(k["local_params"] - total / 2) < 0.02 * total for k in r1["ranks"])
    else:
        stage = 2 if profile == "zero2" else 3
        ds = r1["deepspeed"]
        assert r1["distributed_type"] == "DEEPSPEED" and r1["wrapper"] == "DeepSpeedEngine"
        assert ds["zero_stage"] == stage and ds["train_batch_size"] == 8
        assert ds["optimizer"] == ("DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
        assert ds["inner_optimizer"] == "AdamW"  # torch AdamW kept on CPU (no cpu_adam build)
        assert ds["offload_optimizer"] is (profile == "zero3-offload")
        if stage == 3:
            assert all(abs(k["local_params"] - total / 2) < 0.02 * total for k in r1["ranks"])

    ref = _losses(reference)
    got = {**_losses(r1), **_losses(r2)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in ref.items():
        assert abs(got[step] - loss) < TOL, f"{profile} step {step}: {got[step]} vs one process {loss}"
    assert abs(r2["eval_losses"][-1][1] - reference["eval_losses"][-1][1]) < TOL

    # checkpoint written by the first run, resumed by the second
    assert r1["checkpoint"].endswith("checkpoint-4")
    assert r2["resumed_from"].endswith("checkpoint-4") and r2["resumed_at_step"] == 4 and r2["steps"] == 6
    assert "Traceback" not in stderr
    assert not re.search(r"\[node0 rank1\] INFO", stderr), "the replica printed INFO lines at default levels"
