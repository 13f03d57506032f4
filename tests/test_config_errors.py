"""Each bad YAML fails before any process starts, with one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_launch.training.config import ConfigError, check_device, load_config

ROOT = Path(__file__).resolve().parent.parent


def _good(tmp: Path) -> dict:
    data = tmp / "train.jsonl"
    data.write_text('{"text": "a b c"}\n')
    return {"model": {"config": {"model_type": "llama", "hidden_size": 32}}, "tokenizer": {"train_vocab_size": 300},
            "data": {"train": {"path": str(data)}}, "output_dir": str(tmp / "out")}


def _write(tmp: Path, cfg: dict) -> Path:
    p = tmp / "train.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _edit(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return cfg


BAD = [
    ("optim.learnig_rate", 1e-4, r"unknown key 'optim.learnig_rate' \(did you mean \"learning_rate\"\?\)"),
    ("train.micro_batch_sise", 4, r"unknown key 'train.micro_batch_sise' \(did you mean \"micro_batch_size\"\?\)"),
    ("max_length", "long", r"max_length: .*integer.*\(got 'long'\)"),
    ("train.max_steps", [1], r"train.max_steps: .*integer"),
    ("optim.learning_rate", -1e-4, r"optim.learning_rate: Input should be greater than 0 \(got -0.0001\)"),
    ("data.train", {"path": "missing.jsonl"}, r"data.train.0.path: file '.*missing.jsonl' does not exist"),
    ("consolidate.merge_lora", True, r"consolidate.merge_lora: LoRA options without model.lora"),
    ("model.quantization", {"quant_type": "nf4"}, r"model.quantization \(QLoRA\) needs model.lora"),
    ("task", "finetune", r"task: Input should be 'pretrain' or 'sft' \(got 'finetune'\)"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_yaml_is_one_line_naming_the_field(tmp_path, key, value, message):
    path = _write(tmp_path, _edit(_good(tmp_path), key, value))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_good_yaml_loads(tmp_path):
    cfg = load_config(_write(tmp_path, _good(tmp_path)), ["optim.learning_rate=3e-4", "train.max_steps=7"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.train.max_steps == 7


def test_override_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step' \(did you mean \"max_steps\"\?\)"):
        load_config(_write(tmp_path, _good(tmp_path)), ["train.max_step=3"])


def test_qlora_on_cpu_is_refused(tmp_path):
    cfg = _edit(_edit(_good(tmp_path), "model.lora", {"r": 8}), "model.quantization", {})
    loaded = load_config(_write(tmp_path, cfg))
    check_device(loaded, "cuda")  # fine on a GPU
    with pytest.raises(ConfigError, match=r"model.quantization: QLoRA .* trains only on a CUDA GPU"):
        check_device(loaded, "cpu")


@pytest.mark.parametrize("key,value,field", [("optim.lerning_rate", 1, "optim.lerning_rate"),
                                             ("model.quantization", {}, "model.quantization")])
def test_train_script_fails_fast_with_one_line(tmp_path, key, value, field):
    """`train.py bad.yaml` exits 2 with one line, before torch is even imported (QLoRA checked for the CPU)."""
    cfg = _edit(_good(tmp_path), "model.lora", {"r": 8}) if key == "model.quantization" else _good(tmp_path)
    path = _write(tmp_path, _edit(cfg, key, value))
    code = ("import sys, runpy; sys.argv=['train.py', sys.argv[1]]\n"
            "from tune_launch.training.train import main; rc = main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "TUNE_LAUNCH_DEVICE": "cpu"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("error: ")


def test_launcher_refuses_bad_yaml_before_starting(tmp_path):
    path = _write(tmp_path, _edit(_good(tmp_path), "optim.learning_rate", -1))
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2", "--profile", "ddp", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "optim.learning_rate" in proc.stderr
    assert not (tmp_path / "out").exists()
