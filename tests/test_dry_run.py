"""The exact argv and environment a launch would run, for one node and for node 1 of 2 (exec never happens)."""

from __future__ import annotations

import json
import sys

import pytest
from launch_helpers import HARDWARE, ROOT, training_yaml

from tune_launch.launch import cli
from tune_launch.launch.command import build_command, build_env
from tune_launch.launch.plan import LaunchRequest, make_plan

TRAIN = ["--module", "tune_launch.training.train"]
# what the YAMLs below leave `auto` (precision, weights dtype, Liger, compile, optimizer), resolved for an H100 node
H100_SETTINGS = ["train.precision=bf16", "model.dtype=bfloat16", "train.use_liger_kernel=false",
                 "train.torch_compile=false", "optim.optimizer=adamw_torch_fused"]


def _write_hw(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(HARDWARE[name]))
    return path


def _plan(tmp_path, hw_name, **request):
    from tune_launch.launch.hardware import load_hardware
    from tune_launch.launch.model_facts import model_facts
    from tune_launch.training.config import load_config

    yaml_path = training_yaml(tmp_path, "llama-2-7b", "full", gradient_checkpointing=False)
    cfg = load_config(yaml_path)
    hw = load_hardware(_write_hw(tmp_path, hw_name))
    return yaml_path, make_plan(LaunchRequest(config_path=yaml_path, hardware_given=True, **request), cfg, hw, model_facts(cfg.model))


def test_single_node_eight_gpus_fsdp_argv_and_env(tmp_path):
    yaml_path, plan = _plan(tmp_path, "8x80", profile="fsdp", main_process_port=29611)
    assert build_command(plan) == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "fsdp.yaml"),
        "--num_processes", "8", "--num_machines", "1",
        "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", "29611",
        *TRAIN, str(yaml_path.resolve()), *H100_SETTINGS,
    ]
    assert build_env(plan, {"PATH": "/usr/bin"}) == {
        "OMP_NUM_THREADS": "12",  # 96 cores / 8 processes
        "TOKENIZERS_PARALLELISM": "false",
        "TUNE_LAUNCH_PROFILE": "fsdp",
        "TUNE_LAUNCH_DEVICE": "cuda",
        "TUNE_LAUNCH_NODE_RANK": "0",
        "TUNE_LAUNCH_NUM_NODES": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def test_node_one_of_two_zero3_argv_and_env(tmp_path):
    yaml_path, plan = _plan(tmp_path, "2x8x80", profile="zero3", node_rank=1, main_process_ip="10.1.2.3",
                            main_process_port=29400)
    assert build_command(plan) == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "zero3.yaml"),
        "--deepspeed_config_file", str(ROOT / "deepspeed_configs" / "zero3.json"),
        "--num_processes", "16", "--num_machines", "2",
        "--machine_rank", "1", "--main_process_ip", "10.1.2.3", "--main_process_port", "29400",
        *TRAIN, str(yaml_path.resolve()), *H100_SETTINGS,
    ]
    env = build_env(plan, {"PYTHONPATH": "/opt/site"})
    assert "PYTHONPATH" not in env  # the ranks import the installed package; no path is injected
    assert env["TUNE_LAUNCH_NODE_RANK"] == "1" and env["TUNE_LAUNCH_NUM_NODES"] == "2"
    assert env["TUNE_LAUNCH_PROFILE"] == "zero3" and env["TUNE_LAUNCH_DEVICE"] == "cuda"


def test_auto_settings_are_rendered_after_the_users_overrides(tmp_path):
    from tune_launch.launch.hardware import load_hardware
    from tune_launch.launch.model_facts import model_facts
    from tune_launch.training.config import load_config

    yaml_path = training_yaml(tmp_path, "llama-2-7b", "full")
    text = yaml_path.read_text().replace("micro_batch_size: 1", "micro_batch_size: auto")
    yaml_path.write_text(text)
    cfg = load_config(yaml_path, ["optim.learning_rate=1e-5"])
    plan = make_plan(LaunchRequest(config_path=yaml_path, overrides=("optim.learning_rate=1e-5",), hardware_given=True,
                                   main_process_port=1234), cfg, load_hardware(_write_hw(tmp_path, "8x80")), model_facts(cfg.model))
    tail = build_command(plan)[-8:]
    assert tail == ["optim.learning_rate=1e-5", "train.precision=bf16", "model.dtype=bfloat16", "train.micro_batch_size=1",
                    "train.gradient_checkpointing=false", "train.use_liger_kernel=false", "train.torch_compile=true",
                    "optim.optimizer=adamw_torch_fused"]  # ddp on whole GPUs, no Liger: compile pays
    assert plan.overrides == ("optim.learning_rate=1e-5",) and plan.settings.micro_batch_size == 1


def test_cpu_rehearsal_command(tmp_path):
    from tune_launch.training.config import load_config

    yaml_path = training_yaml(tmp_path, "llama-125m")
    cfg = load_config(yaml_path)
    from tune_launch.launch.hardware import hardware_from_dict

    plan = make_plan(LaunchRequest(config_path=yaml_path, profile="zero2", cpu=True, num_processes=2, main_process_port=4444),
                     cfg, hardware_from_dict(HARDWARE["cpu"]), None)
    argv = build_command(plan)
    assert argv[argv.index("--deepspeed_config_file") + 1] == str(ROOT / "deepspeed_configs" / "zero2.json")
    assert argv[argv.index("--num_processes") + 1] == "2"
    env = build_env(plan, {})
    assert env["TUNE_LAUNCH_DEVICE"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "1"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_dry_run_prints_every_node_and_redacts_secrets(tmp_path, capsys):
    yaml_path = training_yaml(tmp_path, "llama-2-7b")
    hw = _write_hw(tmp_path, "2x8x80")
    # output_dir is on a local disk here; the shared-filesystem preflight check is told to trust it
    env = {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz0123", "PATH": "/usr/bin", "TUNE_LAUNCH_SHARED_FS": "1"}
    code = cli.dispatch(["--dry-run", "--hardware", str(hw), "--profile", "fsdp", "--node-rank", "1",
                         "--main-process-ip", "10.0.0.1", "--main-process-port", "29555", str(yaml_path),
                         "logging.run_name=hf_abcdefghijklmnopqrstuvwxyz0123"], env)
    out = capsys.readouterr().out
    assert code == 0
    assert "# node 0 of 2" in out and "# node 1 of 2 (this node)" in out
    assert out.count("--machine_rank 0") == 1 and out.count("--machine_rank 1") == 1
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in out and "hf_***" in out


def test_fallback_to_cpu_when_no_gpu_and_strict_refuses(tmp_path, capsys):
    from tune_launch.launch.hardware import hardware_from_dict
    from tune_launch.training.config import load_config

    yaml_path = training_yaml(tmp_path, "llama-125m")
    cfg = load_config(yaml_path)
    plan = make_plan(LaunchRequest(config_path=yaml_path, gpus=8), cfg, hardware_from_dict(HARDWARE["cpu"]), None)
    assert plan.profile.name == "cpu" and plan.world_size == 1
    assert len(plan.notes) == 1 and "asked for 8 GPU(s), this machine has none" in plan.notes[0]
    from tune_launch.errors import TuneLaunchError

    with pytest.raises(TuneLaunchError, match="this machine has 0 GPU"):
        make_plan(LaunchRequest(config_path=yaml_path, gpus=8, strict=True), cfg, hardware_from_dict(HARDWARE["cpu"]), None)


def test_fallback_to_the_gpus_that_are_there(tmp_path):
    from tune_launch.launch.hardware import hardware_from_dict
    from tune_launch.launch.model_facts import model_facts
    from tune_launch.training.config import load_config

    yaml_path = training_yaml(tmp_path, "llama-125m")
    cfg = load_config(yaml_path)
    hw = hardware_from_dict(HARDWARE["1x80"])
    plan = make_plan(LaunchRequest(config_path=yaml_path, gpus=8, profile="fsdp"), cfg, hw, model_facts(cfg.model))
    assert plan.world_size == 1 and plan.device == "cuda" and "running on 1 instead" in plan.notes[0]
