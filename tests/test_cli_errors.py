"""Bad input gets one clear line on stderr and exit code 2, never a traceback (real `tune-launch` processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from launch_helpers import ROOT, training_yaml


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_yaml(tmp_path):
    _one_line_error(_run("--dry-run", str(tmp_path / "nope.yaml")), "nope.yaml", "no such file")


def test_unreadable_yaml(tmp_path):
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00model: [")
    _one_line_error(_run("--dry-run", str(bad)), "binary.yaml", "cannot be read")


def test_invalid_yaml_syntax(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    _one_line_error(_run("--dry-run", str(bad)), "broken.yaml", "not valid YAML", "line")


def test_yaml_that_is_a_directory(tmp_path):
    _one_line_error(_run("--dry-run", str(tmp_path)), "is a directory")


def test_unknown_profile_suggests_nearest(tmp_path):
    _one_line_error(_run("--profile", "zero-3", "--dry-run", str(training_yaml(tmp_path, "llama-125m"))),
                    "--profile zero-3", 'did you mean "zero3"')


def test_gpus_zero(tmp_path):
    _one_line_error(_run("--gpus", "0", "--dry-run", str(training_yaml(tmp_path, "llama-125m"))), "--gpus 0", "at least 1")


def test_unknown_model_path(tmp_path):
    path = training_yaml(tmp_path, "llama-125m")
    path.write_text(path.read_text().replace(str(ROOT / "examples" / "models" / "llama-125m" / "config.json"),
                                             "./models/does-not-exist/config.json").replace("config_path", "name_or_path"))
    _one_line_error(_run("plan", str(path)), "model.name_or_path", "does-not-exist", "does not exist")


def test_model_config_path_that_is_not_a_model(tmp_path):
    path = training_yaml(tmp_path, "llama-125m")
    junk = tmp_path / "config.json"
    junk.write_text('{"hidden_size": 8}')
    path.write_text(path.read_text().replace(str(ROOT / "examples" / "models" / "llama-125m" / "config.json"), str(junk)))
    _one_line_error(_run("plan", str(path)), "model.config_path", "cannot load a model config")


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    path = training_yaml(tmp_path, "llama-125m")
    _one_line_error(_run("--dry-run", str(path), "optim.learning_rat=1e-4"), "optim.learning_rat", 'did you mean "learning_rate"')


def test_bad_hardware_file(tmp_path):
    hw = tmp_path / "hw.json"
    hw.write_text('{"nodes": 1, "gpus_per_node": 8, "gpu_mem": 80}')
    _one_line_error(_run("plan", "--hardware", str(hw), str(training_yaml(tmp_path, "llama-125m"))), "unknown keys", "gpu_mem")


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "2", "--gpus", "1"], "--main-process-ip"),
    (["--num-processes", "2"], "--num-processes goes with --cpu"),
    (["--cpu", "--num-processes", "2", "--profile", "zero2-offload"], "cannot be rehearsed"),
])
def test_bad_launch_combinations(tmp_path, args, needle):
    hw = tmp_path / "hw.json"
    hw.write_text('{"nodes": 1, "gpus_per_node": 8, "gpu_memory_gib": 80, "bf16": true, "cpu_ram_gib": 512}')
    _one_line_error(_run("--dry-run", "--hardware", str(hw), *args, str(training_yaml(tmp_path, "llama-125m"))), needle)
