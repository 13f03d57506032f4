"""One resolver for every `auto`: the plan, preflight, the model's load dtype and the trainer's flags agree on
precision for a bf16 GPU, an fp16-only GPU (V100) and the CPU, through the overrides the ranks really get."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from launch_helpers import HARDWARE, training_yaml

from tune_launch.launch.hardware import hardware_from_dict
from tune_launch.launch.model_facts import model_facts
from tune_launch.launch.plan import LaunchRequest, make_plan
from tune_launch.launch.preflight import Probes, checkpoint_bytes
from tune_launch.profiles import PROFILES, get_profile
from tune_launch.training.config import load_config
from tune_launch.training.distributed import RankInfo
from tune_launch.training.settings import DeviceFacts, resolve_settings
from tune_launch.training.trainer import arguments

# hardware -> (device facts a rank there would probe, precision, weights dtype, bytes per weight in a checkpoint)
CASES = {
    "8x80": (DeviceFacts(kind="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, memory_gib=80), "bf16", "bfloat16", 2),
    "4x16": (DeviceFacts(kind="cuda", name="Tesla V100-SXM2-16GB", bf16=False, memory_gib=16), "fp16", "float32", 4),
    "cpu": (DeviceFacts(kind="cpu"), "fp32", "float32", 4),
}


def _values(settings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k not in ("auto_keys", "reasons")}


@pytest.mark.parametrize("hw_name", list(CASES))
def test_plan_preflight_model_and_trainer_agree_on_precision(tmp_path, hw_name):
    import torch

    from tune_launch.training.model import torch_dtype

    dev, precision, weights, weight_bytes = CASES[hw_name]
    path = training_yaml(tmp_path, "llama-125m", "full", gradient_checkpointing="auto", micro_batch_size="auto")
    cfg = load_config(path)
    assert cfg.train.precision == "auto" and cfg.model.dtype == "auto"
    cpu = hw_name == "cpu"
    request = LaunchRequest(config_path=path, profile="ddp", hardware_given=not cpu, cpu=cpu, num_processes=2 if cpu else None,
                            main_process_port=29611)
    plan = make_plan(request, cfg, hardware_from_dict(HARDWARE[hw_name]), None if cpu else model_facts(cfg.model))

    # the plan
    assert (plan.settings.precision, plan.settings.weights_dtype) == (precision, weights)
    if not cpu:
        assert plan.workload.precision == precision and plan.workload.master_weights == (precision == "fp16")
    # preflight: a checkpoint holds the weights in the dtype they are trained in (+ 8 bytes of Adam moments)
    assert checkpoint_bytes(cfg, plan, Probes(num_params=1000)) == 1000 * (weight_bytes + 8)
    # the ranks: the YAML plus exactly the overrides the launcher passes, resolved again with the rank's own facts
    assert f"train.precision={precision}" in plan.rank_overrides and f"model.dtype={weights}" in plan.rank_overrides
    rank_cfg = load_config(path, list(plan.rank_overrides))
    rank = resolve_settings(rank_cfg, dev, get_profile(plan.profile.name))
    assert _values(rank) == _values(plan.settings)
    assert rank.auto_keys == frozenset()  # nothing left for the rank to decide
    assert torch_dtype(rank) == getattr(torch, weights)
    kwargs = arguments(rank_cfg, RankInfo(device=dev.kind, profile=plan.profile.name, world_size=2), False, rank, dev)
    assert (kwargs["bf16"], kwargs["fp16"]) == (precision == "bf16", precision == "fp16")
    assert kwargs["per_device_train_batch_size"] == plan.settings.micro_batch_size
    assert kwargs["activation_checkpointing"] == plan.settings.gradient_checkpointing


def test_a_rank_started_by_hand_resolves_alike():
    """Without the launcher (bare `accelerate launch`): the same rules, and the plan's defaults where it would plan."""
    from tune_launch.training.config import validate_config

    cfg = validate_config({"model": {"config": {"model_type": "llama"}}, "tokenizer": {"train_vocab_size": 100},
                           "data": {"generate": {}}, "train": {"micro_batch_size": "auto"}}, "t")
    gpu = resolve_settings(cfg, CASES["8x80"][0], PROFILES["zero3-offload"])
    assert (gpu.precision, gpu.optimizer, gpu.torch_compile, gpu.micro_batch_size) == ("bf16", "adamw_torch", False, 1)
    cpu = resolve_settings(cfg, DeviceFacts(kind="cpu"), PROFILES["cpu"])
    assert (cpu.precision, cpu.weights_dtype, cpu.micro_batch_size, cpu.gradient_checkpointing) == ("fp32", "float32", 8, False)
    explicit = validate_config({**cfg.model_dump(exclude_unset=True), "train": {"precision": "bf16"}}, "t")
    assert resolve_settings(explicit, DeviceFacts(kind="cpu"), PROFILES["cpu"]).weights_dtype == "float32"  # bf16 autocast
