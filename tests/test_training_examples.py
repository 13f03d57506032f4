"""The shipped example YAMLs are valid, and the real-world ones are planned offline from local model configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tune_launch.training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
REAL_WORLD = {"qlora-alpaca-8b.yaml": "1x24", "lora-chat-8b.yaml": "8x80", "pretrain-1b.yaml": "8x80"}
HARDWARE = {
    "1x24": dict(nodes=1, gpus_per_node=1, gpu_name="NVIDIA GeForce RTX 4090", gpu_memory_gib=24, bf16=True, cpu_ram_gib=64),
    "8x80": dict(nodes=1, gpus_per_node=8, gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=80, bf16=True,
                 cpu_ram_gib=1024, cpu_cores=96),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_valid(name):
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.output_dir.startswith("outputs/")


def test_real_world_examples_exist():
    assert set(REAL_WORLD) <= set(EXAMPLES) and {"pretrain-tiny.yaml", "sft-tiny.yaml"} <= set(EXAMPLES)


@pytest.mark.parametrize("name,hw", sorted(REAL_WORLD.items()))
def test_real_world_example_is_planned_offline(name, hw, tmp_path):
    hw_file = tmp_path / "hw.json"
    hw_file.write_text(json.dumps(HARDWARE[hw]))
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "plan", str(ROOT / "examples" / name), "--hardware", str(hw_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "chosen" in proc.stdout
