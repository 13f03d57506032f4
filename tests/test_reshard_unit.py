"""The pure parts of resuming on another world size: batch arithmetic, the resume decision and its one line, the
partition mappings of round-robin ZeRO checkpoints, the universal folder's life cycle on the filesystem. The real
runs are in tests/test_reshard.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from tune_launch.batching import accumulation_for, alternatives, dividing_micro_batch, process_counts
from tune_launch.errors import TuneLaunchError
from tune_launch.training.checkpoint import MARKER, seal
from tune_launch.training.config import validate_config
from tune_launch.training.reshard import (BatchDecision, ResumePlan, SavedRun, decide_batch, plan_resume,
                                          read_saved_run, rng_seed, with_batch)


def config(tmp_path: Path, **train):
    raw = tiny_config(tmp_path / "model", tmp_path / "out", train={"micro_batch_size": 4, **train})
    return validate_config(raw)


def fake_checkpoint(root: Path, step: int, fingerprint: dict | None = None, files: tuple[str, ...] = ()) -> Path:
    staging = root / ".staging" / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    for name in ("trainer_state.json", *files):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text("{}")
    return seal(staging, root / f"checkpoint-{step}", step, fingerprint)


# --------------------------------------------------------------------------- batch arithmetic

def test_accumulation_keeps_the_global_batch_or_says_what_would():
    assert accumulation_for(64, 4, 8) == 2 and accumulation_for(64, 4, 16) == 1 and accumulation_for(8, 4, 1) == 2
    with pytest.raises(TuneLaunchError) as e:
        accumulation_for(8, 4, 3)
    assert str(e.value) == ("train.global_batch_size 8 cannot be split over 3 process(es) with micro batch 4: it is not a "
                            "multiple of 4 x 3 = 12; what would: train.global_batch_size 12; 1 or 2 processes")
    assert alternatives(12, 8, 1) == ["train.micro_batch_size 6", "train.global_batch_size 8 or 16"]
    assert alternatives(100, 1, 8) == ["train.global_batch_size 96 or 104", "1, 2, 4, 5 or 10 processes"]
    assert dividing_micro_batch(96, 8, 64) == 12 and dividing_micro_batch(9, 2, 8) is None
    assert process_counts(16, 4, 8) == [1, 2, 4] and process_counts(10, 4, 8) == []


def test_dry_run_shows_the_accumulation_that_keeps_the_global_batch(tmp_path, capsys):
    """The launcher decides it too (and prints it): 16 = micro 4 x 2 processes x 2; on 3 processes preflight refuses."""
    from tune_launch.launch.cli import dispatch

    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: {config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                   " num_attention_heads: 2}}\ntokenizer: {train_vocab_size: 300}\ndata: {generate: {kind: pretrain}}\n"
                   f"train: {{micro_batch_size: 4, global_batch_size: 16}}\noutput_dir: {tmp_path / 'out'}\n")
    assert dispatch(["--dry-run", "--cpu", "--num-processes", "2", "--profile", "ddp", str(cfg)], {}) == 0
    out = capsys.readouterr().out
    assert "note      train.gradient_accumulation_steps 1 -> 2: keeps train.global_batch_size 16 on 2 process(es)" in out
    command = next(line for line in out.splitlines() if "accelerate.commands.launch" in line)
    assert command.endswith("train.gradient_accumulation_steps=2"), command
    assert dispatch(["--dry-run", "--cpu", "--num-processes", "3", "--profile", "ddp", str(cfg)], {}) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tune-launch: error: preflight global-batch: train.global_batch_size 16 is not a multiple of micro "
                   "batch 4 x 3 processes = 12: no whole gradient accumulation gives it; fix: use "
                   "train.global_batch_size 12 or 24, or 1, 2 or 4 processes")


def test_an_auto_profile_stays_in_the_checkpoints_family(tmp_path):
    """8 H100s pick DDP for a 125M model; resuming an FSDP checkpoint (written by 16 processes) the plan keeps FSDP,
    and says how the checkpoint's global batch is kept on 8 (micro 1 x 16 x 1 -> 1 x 8 x 2)."""
    from launch_helpers import hardware, training_yaml

    from tune_launch.launch.model_facts import model_facts
    from tune_launch.launch.plan import LaunchRequest, make_plan
    from tune_launch.training.config import load_config
    from tune_launch.training.reshard import ResumeFacts

    cfg = load_config(training_yaml(tmp_path, "llama-125m", "full", gradient_checkpointing=False))
    facts = model_facts(cfg.model)
    request = LaunchRequest(config_path=tmp_path / "t.yaml", hardware_given=True, planning=True)
    assert make_plan(request, cfg, hardware("8x80"), facts).profile.name == "ddp"
    resume = ResumeFacts(tmp_path / "checkpoint-300", SavedRun(16, 1, 1, "fsdp"))
    plan = make_plan(request, cfg, hardware("8x80"), facts, resume)
    assert plan.profile.name == "fsdp" and plan.reason.startswith("fsdp: the family of checkpoint-300, which ddp")
    assert plan.rank_overrides[-1] == "train.gradient_accumulation_steps=2"
    assert ("resuming checkpoint-300: world size 16 -> 8, gradient accumulation 1 -> 2; global batch kept: 16 = micro "
            "batch 1 x 8 process(es) x accumulation 2; FSDP reshards the checkpoint on load") in plan.notes
    cpu = make_plan(LaunchRequest(config_path=tmp_path / "t.yaml", cpu=True, planning=True), cfg, hardware("cpu"), None,
                    ResumeFacts(tmp_path / "checkpoint-300", SavedRun(2, 1, 1, "deepspeed-zero3")))
    assert cpu.profile.name == "zero3" and cpu.rank_overrides[-1] == "train.gradient_accumulation_steps=2"


# --------------------------------------------------------------------------- the resume decision

def test_global_batch_size_decides_the_accumulation_on_any_world(tmp_path):
    cfg = config(tmp_path, global_batch_size=8, gradient_accumulation_steps=7)
    saved = SavedRun(world_size=2, micro_batch_size=4, gradient_accumulation_steps=1, layout="fsdp")
    assert decide_batch(cfg, 1, saved) == BatchDecision(4, 1, 2, "train.global_batch_size")
    assert decide_batch(cfg, 2, None).accumulation == 1
    assert with_batch(cfg, decide_batch(cfg, 1, saved)).train.gradient_accumulation_steps == 2
    with pytest.raises(TuneLaunchError, match=r"^train.global_batch_size 8 cannot be split over 3 process"):
        decide_batch(cfg, 3, saved)


def test_without_global_batch_size_a_resharded_resume_keeps_the_checkpoints(tmp_path):
    cfg = config(tmp_path, gradient_accumulation_steps=1)
    saved = SavedRun(world_size=4, micro_batch_size=4, gradient_accumulation_steps=2, layout="fsdp")  # 32
    assert decide_batch(cfg, 2, saved) == BatchDecision(4, 2, 4, "checkpoint")
    assert decide_batch(cfg, 4, saved) == BatchDecision(4, 4, 1, "train.gradient_accumulation_steps")  # same world: the YAML
    with pytest.raises(TuneLaunchError) as e:
        decide_batch(cfg, 3, saved)
    assert str(e.value) == ("checkpoint.resume: the checkpoint's global batch 32 (4 x 4 processes x 2) cannot be kept on 3 "
                            "process(es) with micro batch 4; what would: train.global_batch_size 24 or 36; 1, 2, 4 or 8 "
                            "processes; or set train.global_batch_size")
    assert decide_batch(cfg, 2, SavedRun(world_size=4)).source == "train.gradient_accumulation_steps"  # an older marker


def test_the_one_line_says_what_changed(tmp_path):
    ckpt = tmp_path / "checkpoint-40"
    saved = SavedRun(world_size=2, micro_batch_size=4, gradient_accumulation_steps=1)
    fsdp = ResumePlan(ckpt, saved, BatchDecision(4, 1, 2, "train.global_batch_size"), "fsdp")
    assert fsdp.resharded and not fsdp.needs_universal
    assert fsdp.line() == ("resuming checkpoint-40: world size 2 -> 1, gradient accumulation 1 -> 2; global batch kept: "
                           "8 = micro batch 4 x 1 process(es) x accumulation 2; FSDP reshards the checkpoint on load")
    zero = ResumePlan(ckpt, saved, BatchDecision(4, 4, 1, "train.global_batch_size"), "deepspeed-zero3")
    assert zero.needs_universal and zero.line().endswith("global batch 8 -> 16 = micro batch 4 x 4 process(es) x "
                                                         "accumulation 1 (the data position is counted in the new global "
                                                         "batch, so it is not exact); DeepSpeed loads it as a universal checkpoint")
    same = ResumePlan(ckpt, saved, BatchDecision(4, 2, 1, "train.gradient_accumulation_steps"), "deepspeed-zero2")
    assert not same.resharded and not same.needs_universal and same.line() is None
    fresh = ResumePlan(None, SavedRun(), BatchDecision(4, 2, 3, "train.global_batch_size"), "plain")
    assert fresh.line() == "global batch 24 = micro batch 4 x 2 process(es) x accumulation 3 (train.global_batch_size)"


def test_saved_run_from_the_marker_or_the_rng_files(tmp_path):
    fp = {"world_size": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 8, "layout": "deepspeed-zero2"}
    assert read_saved_run(fake_checkpoint(tmp_path, 1, fp)) == SavedRun(4, 2, 8, "deepspeed-zero2")
    assert read_saved_run(fake_checkpoint(tmp_path, 2, None, ("rng_state_0.pth", "rng_state_2.pth", "rng_state_1.pth"))).world_size == 3
    assert read_saved_run(fake_checkpoint(tmp_path, 3, None, ("rng_state.pth",))).world_size == 1
    assert read_saved_run(fake_checkpoint(tmp_path, 4)) == SavedRun()
    plan = plan_resume(config(tmp_path, global_batch_size=32), 2, tmp_path / "checkpoint-1", "deepspeed-zero2")
    assert plan.needs_universal and plan.batch.accumulation == 4


def test_reseeded_streams_differ_per_rank_and_step():
    seeds = {rng_seed(42, step, rank) for step in (100, 101) for rank in range(8)}
    assert len(seeds) == 16 and 42 not in seeds and rng_seed(42, 100, 0) == rng_seed(42, 100, 0)


# --------------------------------------------------------------------------- round-robin partition mappings

def test_fragment_mappings_follow_the_reordered_flat_buffer():
    from tune_launch.training.zero_universal import fragment_mappings

    # round robin over 2 ranks puts p0, p2 first, then p1, p3 (the order param_shapes is saved in)
    shapes = [{"p0": (2, 2), "p2": (4,), "p1": (4,), "p3": (2, 2)}]
    assert fragment_mappings(shapes, [[0, 0, 0, 0]], [8], 0) == [{"p0": (0, 4), "p2": (4, 4)}]
    assert fragment_mappings(shapes, [[0, 0, 0, 0]], [8], 1) == [{"p1": (0, 4), "p3": (4, 4)}]
    # a parameter across the partition boundary, and an alignment padding after the first one
    shapes = [{"a": (6,), "b": (4,), "c": (6,)}]
    assert fragment_mappings(shapes, [[2, 0, 0]], [9], 0) == [{"a": (0, 6), "b": (8, 1)}]
    assert fragment_mappings(shapes, [[2, 0, 0]], [9], 1) == [{"b": (0, 3), "c": (3, 6)}]


def test_verify_catches_scrambled_weights(tmp_path):
    import torch

    from tune_launch.training.zero_universal import verify

    module = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "h": torch.ones(5, dtype=torch.bfloat16)}
    for name, value in (("w", module["w"].clone()), ("h", torch.full((5,), 1.001))):  # h: fp32 master of a bf16 weight
        (tmp_path / "zero" / name).mkdir(parents=True)
        torch.save({"param": value}, tmp_path / "zero" / name / "fp32.pt")
    verify(tmp_path, module)
    torch.save({"param": module["w"].flip(0)}, tmp_path / "zero" / "w" / "fp32.pt")
    with pytest.raises(SystemExit, match="w differs from the checkpoint's weights by up to 8"):
        verify(tmp_path, module)


# --------------------------------------------------------------------------- the universal folder on disk

def zero_checkpoint(root: Path, step: int = 4) -> Path:
    ckpt = fake_checkpoint(root, step, {"world_size": 2, "layout": "deepspeed-zero2"},
                           (f"global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest"))
    (ckpt / "latest").write_text(f"global_step{step}")
    return ckpt


def test_tag_and_readiness(tmp_path):
    from tune_launch.training import universal as U

    ckpt = zero_checkpoint(tmp_path)
    assert U.zero_tag(ckpt) == "global_step4" and U.universal_dir(ckpt) == ckpt / "global_step4_universal"
    assert not U.is_ready(ckpt)
    staged = tmp_path / ".staging" / "u" / "global_step4_universal"
    (staged / "zero").mkdir(parents=True)
    (staged / "zero" / "optimizer_state.pt").write_bytes(b"x" * 10)
    seal(staged, U.universal_dir(ckpt), 4)
    assert not U.is_ready(ckpt)  # sealed but latest_universal not written yet
    U.write_latest(ckpt, "global_step4_universal")
    assert U.is_ready(ckpt)
    (ckpt / "latest").unlink()
    assert U.zero_tag(ckpt) == "global_step4"  # the only global_step folder (the universal one is not a tag)
    (ckpt / "global_step8").mkdir()
    with pytest.raises(TuneLaunchError, match="holds 2 DeepSpeed global_step folders and no usable `latest` file"):
        U.zero_tag(ckpt)


def test_sealed_but_unannounced_universal_folder_is_finished_not_converted_again(tmp_path):
    """A kill between the rename and latest_universal: the next resume writes latest_universal and converts nothing."""
    from tune_launch.training import universal as U

    ckpt = zero_checkpoint(tmp_path)
    staged = tmp_path / ".staging" / "u" / "global_step4_universal"
    (staged / "zero").mkdir(parents=True)
    seal(staged, U.universal_dir(ckpt), 4)
    folder, converted = U.ensure_universal(ckpt, tmp_path, rank=0, source_world=2)
    assert folder == U.universal_dir(ckpt) and not converted and U.is_ready(ckpt)


def test_waiting_ranks_stop_with_rank_0s_failure_or_its_silence(tmp_path):
    from tune_launch.training import universal as U

    ckpt = zero_checkpoint(tmp_path)
    failed, beat = tmp_path / "x.failed", tmp_path / "x.heartbeat"
    failed.write_text("checkpoint.resume: converting ... failed (boom)")
    with pytest.raises(U.ConversionError, match=r"failed \(boom\)"):
        U._wait_for_rank0(ckpt, failed, beat)
    failed.unlink()
    beat.write_text("1")
    t0 = time.monotonic()
    with pytest.raises(U.ConversionError, match=r"rank 0 stopped converting .* \(no heartbeat for 1 s\)"):
        U._wait_for_rank0(ckpt, failed, beat, stale_s=1.0)
    assert time.monotonic() - t0 < 10

    def finish():  # rank 0 announces the folder while the waiter polls
        time.sleep(1.0)
        staged = tmp_path / ".staging" / "v" / "global_step4_universal"
        (staged / "zero").mkdir(parents=True)
        seal(staged, U.universal_dir(ckpt), 4)
        U.write_latest(ckpt, "global_step4_universal")

    threading.Thread(target=finish).start()
    U._wait_for_rank0(ckpt, failed, beat, stale_s=30.0)
    assert U.is_ready(ckpt)


@pytest.mark.slow
def test_a_failed_conversion_is_one_line_and_leaves_the_checkpoint_as_it_was(tmp_path):
    """The converter itself runs (a real subprocess) on optimizer files that are not ZeRO files."""
    from tune_launch.training import universal as U

    ckpt = zero_checkpoint(tmp_path)
    before = sorted((p.relative_to(ckpt), p.read_bytes()) for p in ckpt.rglob("*") if p.is_file())
    with pytest.raises(U.ConversionError) as e:
        U.ensure_universal(ckpt, tmp_path, rank=0, source_world=2)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint.resume: {tmp_path.name}/checkpoint-4 for another world size failed: ".replace(
        "checkpoint.resume: ", "checkpoint.resume: converting ")), msg
    assert msg.endswith(f"; resume on 2 processes (no conversion), or see {tmp_path}/.tune_launch/universal-checkpoint-4-convert.log")
    assert "\n" not in msg and len(msg) < 300 + len(str(tmp_path))
    assert sorted((p.relative_to(ckpt), p.read_bytes()) for p in ckpt.rglob("*") if p.is_file()) == before
    notes = list((tmp_path / ".staging").glob("universal-checkpoint-4-*.failed"))
    assert len(notes) == 1 and notes[0].read_text() == msg  # what waiting ranks read
    assert json.loads((ckpt / MARKER).read_text())["step"] == 4
