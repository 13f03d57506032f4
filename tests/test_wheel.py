"""The user's path: build the wheel, install it with its dependencies into a fresh virtual environment outside the
checkout, and use it from a temporary folder (profiles, a one-step training, a real 2-process checkpoint consolidated
in-run and by the CLI, every module importable). The checkout is never on that environment's path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine's disk (see the Makefile); anything else downloads CUDA


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, tune-launch executable, a clean environment, a work folder, the wheel)."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("tune_launch-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    env["HF_HUB_OFFLINE"] = "1"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in ([TORCH_PIN], [str(wheel)]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200, env=env, cwd=base)
        assert done.returncode == 0, done.stderr[-3000:]
    work = base / "work"
    work.mkdir()
    return py, venv / "bin" / "tune-launch", env, work, wheel


def _run(argv, env, cwd, timeout=600):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_wheel_has_one_top_level_package(installed):
    *_, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["tune_launch"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tune_launch"}
    for must in ("tune_launch/launch/consolidation/core.py", "tune_launch/training/train.py",
                 "tune_launch/accelerate_configs/fsdp.yaml", "tune_launch/deepspeed_configs/zero3.json",
                 "tune_launch/slurm_scripts/multi_node.sh"):
        assert must in names, must


@pytest.mark.slow
def test_every_module_imports_from_the_installed_package(installed):
    py, _, env, work, _ = installed
    probe = ("import importlib, json, pkgutil, tune_launch; "
             "mods = [m.name for m in pkgutil.walk_packages(tune_launch.__path__, 'tune_launch.') if not m.name.endswith('__main__')]; "
             "[importlib.import_module(m) for m in mods]; "
             "print(json.dumps({'file': tune_launch.__file__, 'modules': mods}))")
    found = json.loads(_run([py, "-c", probe], env, work).stdout)
    assert found["file"].startswith(str(py.parent.parent)), found["file"]  # the venv's copy, not the checkout
    assert "tune_launch.launch.consolidation.core" in found["modules"]
    assert len(found["modules"]) >= 50


@pytest.mark.slow
def test_profiles_training_and_consolidation_from_the_wheel(installed, tmp_path):
    py, tune_launch, env, work, _ = installed
    listing = _run([tune_launch, "profiles"], env, work).stdout
    assert listing.split()[0] == "cpu" and "zero3-offload" in listing
    example = work / "pretrain-tiny.yaml"
    shutil.copy(ROOT / "examples" / "pretrain-tiny.yaml", example)
    _run([tune_launch, example, "train.max_steps=1", "output_dir=one-step", "eval.eval_at_start=false"], env, work)
    assert json.loads((work / "one-step" / "run_report.json").read_text())["steps"] == 1
    assert (work / "one-step" / "report.png").stat().st_size > 10_000  # matplotlib came with the wheel's dependencies

    # A real 2-process FSDP checkpoint, consolidated in-run (consolidate.enabled) and by the CLI.
    cfg = yaml.safe_load(example.read_text())
    cfg.update(output_dir="fsdp-run", consolidate={"enabled": True, "dtype": "fp32"})
    cfg["train"].update(max_steps=2, micro_batch_size=4)
    cfg["checkpoint"].update(save_steps=2)
    cfg["eval"].update(eval_at_start=False)
    cfg["data"]["generate"].update(train_samples=200, eval_samples=20)
    two = work / "fsdp.yaml"
    two.write_text(yaml.safe_dump(cfg))
    run = _run([tune_launch, "--cpu", "--num-processes", "2", "--profile", "fsdp", two], env, work)
    assert "consolidated fsdp" in run.stderr, run.stderr[-3000:]
    assert (work / "fsdp-run" / "consolidated" / "model.safetensors.index.json").is_file()
    _run([tune_launch, "consolidate", work / "fsdp-run" / "checkpoint-2", tmp_path / "hf", "--verify", "--quiet"], env, work)
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
             "a, b = M.from_pretrained(sys.argv[1]), M.from_pretrained(sys.argv[2]); "
             "assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))")
    _run([py, "-c", probe, tmp_path / "hf", work / "fsdp-run" / "consolidated"], env, work)
