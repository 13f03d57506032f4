"""Resuming on another number of processes, with real gloo processes through `tune-launch --cpu`.

Per profile (fsdp, zero2, zero3) one chain: 2 processes train steps 1-2, 1 process resumes for steps 3-4, 2 processes
resume for 5-6, with train.global_batch_size 8 and micro batch 4 (accumulation 1 -> 2 -> 1). Every step's loss
must equal one uninterrupted process with the same global batch (8 = micro 8 x 1 x 1) within the rehearsal tests'
1e-4 (measured: within 1e-6). One reference serves every profile: each profile's own uninterrupted run equals it
(tests/test_training_rehearsal.py).

The zero2 chain also kills the whole job with SIGKILL while the universal conversion runs (the checkpoint stays
byte-identical, the next resume converts again), and kills the 2-process resume after step 5, before its next
save, so that the second resume from the same checkpoint reuses the universal checkpoint instead of converting.
About 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, check_ok, launch, report, tiny_config, write_yaml
from tune_launch.training.checkpoint import MARKER, inspect_checkpoint
from tune_launch.training.faults import FAULT_ENV

pytestmark = pytest.mark.slow
TOL = 1e-4
CONVERTER = "tune_launch.training.zero_universal"


SECTIONS = dict(train={"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6},
                checkpoint={"save_steps": 2, "save_total_limit": 5, "save_final_model": False})


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[int, float]:
    """One process, micro batch 8: the same global batch of 8 in one piece, 6 steps uninterrupted."""
    tmp = tmp_path_factory.mktemp("reshard-ref")
    cfg = tiny_config(tiny_model_dir, tmp / "out", **SECTIONS)
    cfg["train"] = {**cfg["train"], "micro_batch_size": 8}
    check_ok(launch(write_yaml(tmp / "ref.yaml", cfg)))
    r = report(tmp / "out")
    assert r["world_size"] == 1 and r["distributed_type"] == "NO" and r["batch"]["global_batch"] == 8
    return dict(r["train_losses"])


def run(cfg: Path, steps: int, profile: str, processes: int) -> tuple[dict, str]:
    proc = launch(cfg, f"train.max_steps={steps}", profile=profile, processes=processes)
    check_ok(proc)
    return report(cfg.parent / f"{cfg.stem}-out"), proc.stderr


def checkpoint_hashes(ckpt: Path) -> dict[str, str]:
    return {str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def assert_ran(r: dict, profile: str, world: int, accumulation: int) -> None:
    """What really ran: the world size, the wrapper, the accumulation that kept the global batch."""
    assert r["world_size"] == world and r["num_processes"] == world and r["profile"] == profile
    assert r["distributed_type"] == ("FSDP" if profile == "fsdp" else "DEEPSPEED"), r["distributed_type"]
    if profile != "fsdp":
        assert r["deepspeed"]["zero_stage"] == int(profile[-1]) and r["deepspeed"]["train_batch_size"] == 8
    assert r["batch"]["to_accumulation"] == accumulation and r["batch"]["global_batch"] == 8


def assert_losses(got: dict[int, float], reference: dict[int, float], steps: list[int], profile: str) -> None:
    assert sorted(got) == steps, (profile, sorted(got))
    for step in steps:
        assert abs(got[step] - reference[step]) < TOL, f"{profile} step {step}: {got[step]} vs uninterrupted {reference[step]}"


def start(cfg: Path, steps: int, profile: str, processes: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", str(processes), "--profile", profile,
            str(cfg), f"train.max_steps={steps}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> list:
    """SIGKILL a process and all its descendants; returns them (psutil handles, safe against pid reuse)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    return procs


def kill_during_conversion(cfg: Path, steps: int, profile: str, processes: int) -> None:
    """Start the resume, SIGKILL the launcher, its ranks and the converter while the converter runs."""
    import psutil

    proc = start(cfg, steps, profile, processes)
    deadline = time.monotonic() + 240
    converter = None
    while time.monotonic() < deadline and proc.poll() is None and converter is None:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if CONVERTER in " ".join(p.cmdline()):
                    converter = p
            except psutil.Error:
                pass
        time.sleep(0.02)
    assert converter is not None, f"the conversion never started:\n{proc.communicate()[0][-3000:]}"
    killed = kill_tree(proc.pid)
    assert converter in killed
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(killed, timeout=30)
    assert not alive, f"survived kill -9 of the job: {alive}"


def yaml_for(tmp: Path, tiny_model_dir: Path, profile: str) -> tuple[Path, Path]:
    out = tmp / f"{profile}-out"  # where run() reads the report
    return write_yaml(tmp / f"{profile}.yaml", tiny_config(tiny_model_dir, out, **SECTIONS)), out


@pytest.mark.parametrize("profile", ["fsdp", "zero3"])
def test_train_on_2_resume_on_1_then_on_2(profile, tiny_model_dir, tmp_path, reference):
    cfg, out = yaml_for(tmp_path, tiny_model_dir, profile)
    r1, _ = run(cfg, 2, profile, 2)
    assert_ran(r1, profile, 2, 1)
    r2, err2 = run(cfg, 4, profile, 1)
    assert_ran(r2, profile, 1, 2)
    assert r2["resumed_from"] == str(out / "checkpoint-2")
    assert ("resuming checkpoint-2: world size 2 -> 1, gradient accumulation 1 -> 2; global batch kept: 8 = micro batch 4 "
            "x 1 process(es) x accumulation 2") in err2
    r3, err3 = run(cfg, 6, profile, 2)
    assert_ran(r3, profile, 2, 1)
    assert "resuming checkpoint-4: world size 1 -> 2, gradient accumulation 2 -> 1" in err3
    assert "random streams reseeded per rank" in err3
    if profile == "zero3":
        for ckpt, tag in ((out / "checkpoint-2", "global_step2"), (out / "checkpoint-4", "global_step4")):
            assert inspect_checkpoint(ckpt / f"{tag}_universal").complete
            assert (ckpt / "latest_universal").read_text() == f"{tag}_universal"
        assert r3["batch"]["converted"] and r3["batch"]["universal"] == str(out / "checkpoint-4" / "global_step4_universal")
    else:
        assert not list(out.glob("checkpoint-*/*_universal")) and r3["batch"]["universal"] is None
    got = {**dict(r1["train_losses"]), **dict(r2["train_losses"]), **dict(r3["train_losses"])}
    assert_losses(got, reference, [1, 2, 3, 4, 5, 6], profile)
    if profile == "fsdp":
        assert_family_change_refused(cfg, out)


def assert_family_change_refused(cfg: Path, out: Path) -> None:
    """FSDP shards cannot become ZeRO partitions: one line before training, exit 2, nothing converted or written."""
    proc = launch(cfg, "train.max_steps=8", profile="zero2", processes=1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert ("failed: ConfigError: checkpoint.resume: fsdp-out/checkpoint-6 holds FSDP shards, which DeepSpeed ZeRO-2 "
            "cannot load: resume with --profile fsdp or fsdp-offload, or `tune-launch consolidate` it and start a new run "
            "from that (or start over: a new output_dir, or checkpoint.resume: never); every rank had exited") in last, last
    assert "Traceback" not in proc.stderr and not (out / "checkpoint-8").exists()
    assert not list(out.glob(".staging/universal-*")) and not list(out.glob("checkpoint-*/*_universal"))


def test_zero2_kill_9_during_conversion_then_resume_and_reuse(tiny_model_dir, tmp_path, reference):
    profile = "zero2"
    cfg, out = yaml_for(tmp_path, tiny_model_dir, profile)
    r1, _ = run(cfg, 2, profile, 2)
    assert_ran(r1, profile, 2, 1)
    ckpt = out / "checkpoint-2"
    before = checkpoint_hashes(ckpt)

    kill_during_conversion(cfg, 4, profile, 1)
    assert checkpoint_hashes(ckpt) == before, "the kill during the conversion changed the checkpoint"
    assert not (ckpt / "global_step2_universal").exists() and not (ckpt / "latest_universal").exists()
    assert list((out / ".staging").glob("universal-checkpoint-2-*")), "the conversion had not started writing"

    r2, err2 = run(cfg, 4, profile, 1)
    assert_ran(r2, profile, 1, 2)
    assert "converting checkpoint-2 (written by 2 process(es)) to a universal checkpoint" in err2
    assert "round_robin_gradients checkpoint: partition mappings recomputed" in (out / ".tune_launch" / "universal-checkpoint-2-convert.log").read_text()
    assert not list((out / ".staging").glob("universal-checkpoint-2-*")), "the killed attempt's staging was left"
    universal = ckpt / "global_step2_universal"
    assert inspect_checkpoint(universal).complete and r2["batch"]["converted"]
    assert {k: v for k, v in checkpoint_hashes(ckpt).items() if k in before} == before  # originals untouched
    assert json.loads((universal / MARKER).read_text())["fingerprint"] == {"universal_of": "global_step2", "source_world_size": 2}

    # back on 2 processes: killed after step 5, before its next save; the second resume from checkpoint-4 reuses
    killed = launch(cfg, "train.max_steps=6", profile=profile, processes=2, env={FAULT_ENV: "at=step,step=5,how=kill"})
    assert killed.returncode != 0 and not (out / "checkpoint-6").exists()
    marker = out / "checkpoint-4" / "global_step4_universal" / MARKER
    first = marker.stat()
    r3, err3 = run(cfg, 6, profile, 2)
    assert_ran(r3, profile, 2, 1)
    assert "reusing the universal checkpoint" in err3 and "converting checkpoint-4" not in err3
    assert not r3["batch"]["converted"] and (marker.stat().st_ino, marker.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    got = {**dict(r1["train_losses"]), **dict(r2["train_losses"]), **dict(r3["train_losses"])}
    assert_losses(got, reference, [1, 2, 3, 4, 5, 6], profile)
