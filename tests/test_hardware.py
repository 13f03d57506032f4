"""Hardware from a file (flat form or `detect --json`), detection on this GPU-less machine, SLURM environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tune_launch.errors import TuneLaunchError
from tune_launch.launch.hardware import detect_hardware, detect_json, hardware_from_dict, load_hardware, peak_bf16_flops

FLAT = {"nodes": 2, "gpus_per_node": 8, "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 80, "bf16": True, "cpu_ram_gib": 1024}


def test_flat_form(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(FLAT))
    hw = load_hardware(path)
    assert (hw.nodes, hw.gpus_per_node, hw.total_gpus, hw.gpu_memory_gib, hw.bf16, hw.cpu_ram_gib) == (2, 8, 16, 80, True, 1024)
    assert peak_bf16_flops(hw.gpu_name) == 989e12


def test_detect_json_roundtrip_with_injected_gpus():
    hw = hardware_from_dict(FLAT)
    gpus = [{"index": i, "name": "NVIDIA A100-SXM4-40GB", "memory_gib": 39.4, "compute_capability": "8.0", "bf16": True} for i in range(4)]
    data = detect_json(hw, gpus=gpus)
    data.pop("gpus_per_node")
    data.pop("gpu_name")
    data.pop("gpu_memory_gib")
    again = hardware_from_dict(data)
    assert again.gpus_per_node == 4 and again.gpu_name == "NVIDIA A100-SXM4-40GB" and again.gpu_memory_gib == 39.4


def test_detect_on_this_machine_has_no_gpu_and_real_cpu_facts(tmp_path):
    hw = detect_hardware(tmp_path / "not-yet" / "out", env={})
    assert hw.gpus_per_node == 0 and not hw.has_gpu
    assert hw.cpu_cores >= 1 and hw.cpu_ram_gib > 1 and hw.disk_free_gib > 0
    assert hw.versions["torch"].startswith("2.") and hw.slurm is None
    again = hardware_from_dict(json.loads(json.dumps(detect_json(hw))))
    assert again.cpu_cores == hw.cpu_cores and again.gpus_per_node == 0


def test_detect_cli_json_parses():
    out = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "detect", "--json"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    data = json.loads(out)
    assert data["gpus"] == [] and data["total_gpus"] == 0 and "deepspeed" in data["versions"]


@pytest.mark.parametrize("data,needle", [
    ({"nodes": 1, "gpus_per_node": 8}, "gpu_memory_gib"),
    ({"nodes": 0, "gpus_per_node": 0}, "nodes"),
    ({"nodes": "two"}, "non-negative integer"),
    ({"gpu_memory": 80}, "unknown keys"),
    ([1, 2], "JSON object"),
])
def test_bad_hardware_is_one_clear_error(data, needle):
    with pytest.raises(TuneLaunchError, match=needle):
        hardware_from_dict(data)


def test_detect_reads_the_slurm_allocation_with_the_one_slurm_reader():
    from tune_launch.launch.slurm import SlurmJob

    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "SLURM_RESTART_COUNT": "1"}
    hw = detect_hardware(".", env)
    assert hw.slurm == SlurmJob.from_environ(env) and hw.nodes == 2 and hw.cpu_cores <= 64
    assert (hw.slurm.main_host, hw.slurm.node_rank, hw.slurm.restart_count) == ("n1", 1, 1)
    assert hardware_from_dict(hw.to_json()).slurm == hw.slurm  # detect --json round-trips
