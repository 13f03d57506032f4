"""Every shipped config loads with accelerate's and DeepSpeed's own loaders (the wheel: tests/test_wheel.py)."""

from __future__ import annotations

import json

import pytest
from launch_helpers import ROOT

from tune_launch.profiles import PROFILES, config_file, get_profile

ACCELERATE = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
DEEPSPEED = sorted((ROOT / "deepspeed_configs").glob("*.json"))


def test_every_profile_has_its_files():
    assert {p.accelerate_config for p in PROFILES.values()} == {f.name for f in ACCELERATE}
    assert {p.deepspeed_config for p in PROFILES.values() if p.deepspeed_config} == {f.name for f in DEEPSPEED}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_loads_config(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    profile = next(p for p in PROFILES.values() if p.accelerate_config == path.name)
    expected = {"cpu": DistributedType.NO, "single": DistributedType.NO, "ddp": DistributedType.MULTI_GPU,
                "fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}[profile.strategy]
    assert cfg.distributed_type == expected
    if profile.strategy == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
        assert cfg.fsdp_config["fsdp_offload_params"] is profile.offload_params
    if profile.strategy == "deepspeed":
        ds_file = cfg.deepspeed_config["deepspeed_config_file"]
        assert (ROOT / ds_file).resolve() == profile.deepspeed_config_path


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_loads_config(path):
    """Fill the Hugging Face "auto" values the way the Trainer does, then DeepSpeed's own DeepSpeedConfig parses it."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    raw = json.loads(path.read_text())
    hf = HfTrainerDeepSpeedConfig(raw)
    args = TrainingArguments(output_dir="/tmp/ds-check", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             bf16=True, use_cpu=True, report_to=[])
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, _TinyModel(), num_training_steps=10)
    ds = DeepSpeedConfig(hf.config)
    profile = next(p for p in PROFILES.values() if p.deepspeed_config == path.name)
    assert ds.zero_optimization_stage == profile.zero_stage
    assert ds.bfloat16_config.enabled if hasattr(ds, "bfloat16_config") else ds.bfloat16_enabled
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_accumulation_steps == 2
    offload = ds.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == profile.offload_optimizer
    param_offload = ds.zero_config.offload_param
    assert (param_offload is not None and param_offload.device == "cpu") == profile.offload_params


class _TinyModel:
    class config:  # noqa: N801 - mimics a transformers config
        hidden_size = 64
        hidden_sizes = None


def test_unknown_profile_suggests_nearest():
    from tune_launch.errors import TuneLaunchError

    with pytest.raises(TuneLaunchError, match='did you mean "fsdp-offload"'):
        get_profile("fsdp_offload")


def test_profiles_command_lists_each_profile_once(capsys):
    from tune_launch.launch.cli import main

    assert main(["profiles"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(PROFILES)


def test_config_file_is_found_in_the_checkout():
    assert config_file("accelerate_configs", "ddp.yaml") == ROOT / "accelerate_configs" / "ddp.yaml"
