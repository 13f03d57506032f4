"""A model config the ranks could not build stops the launch before any process starts, on the cpu profile too:
one line naming the field, exit 2, no traceback (real `tune-launch --cpu` launches, not dry runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def write_yaml(tmp: Path, model: str) -> Path:
    path = tmp / "train.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {model}
        tokenizer: {{train_vocab_size: 300}}
        data: {{generate: {{kind: pretrain, train_samples: 40, eval_samples: 4}}}}
        max_length: 32
        train: {{micro_batch_size: 2, max_steps: 1}}
        output_dir: {tmp / "out"}
        """))
    return path


def launch(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", str(config)], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=180)


def refused_in_one_line(proc: subprocess.CompletedProcess, tmp: Path) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp / "out").exists(), "a process started"  # the ranks create output_dir/heartbeat and logs first
    return lines[0]


CASES = {
    "wrong type": ({"hidden_size": "abc"}, "model.config.hidden_size: expected int, got str (value: 'abc')"),
    "negative size": ({"intermediate_size": -64}, "model.config.intermediate_size: -64 is not a valid size"),
    "unknown model_type": ({"model_type": "lama"}, "model.config.model_type: unknown model type 'lama' (did you mean \"llama\"?)"),
}


def launch_all(configs: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    """The launches side by side (each pays the transformers import once; the cases do not depend on each other)."""
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = {case: pool.submit(launch, config) for case, config in configs.items()}
        return {case: f.result() for case, f in futures.items()}


def test_an_inline_model_config_with_a_bad_value_is_refused_before_launch(tmp_path):
    folders = {case: tmp_path / case.replace(" ", "-") for case in CASES}
    configs = {}
    for case, (change, _) in CASES.items():
        folders[case].mkdir()
        configs[case] = write_yaml(folders[case], json.dumps({"config": {**GOOD, **change}}))
    for case, proc in launch_all(configs).items():
        line = refused_in_one_line(proc, folders[case])
        assert line.startswith(f"tune-launch: error: {CASES[case][1]}"), (case, line)


FILE_CASES = {
    "wrong type": ({"hidden_size": "abc"}, "hidden_size: expected int, got str"),
    "heads": ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads 4"),
    "activation": ({"hidden_act": "swishy"}, "no llama model builds from it (KeyError"),
}


@pytest.mark.slow
def test_a_config_file_with_a_bad_value_is_refused_naming_the_file_and_field(tmp_path):
    configs, files = {}, {}
    for case, (change, _) in FILE_CASES.items():
        folder = tmp_path / case
        folder.mkdir()
        files[case] = folder / "config.json"
        files[case].write_text(json.dumps({**GOOD, **change}))
        configs[case] = write_yaml(folder, json.dumps({"config_path": str(files[case])}))
    for case, proc in launch_all(configs).items():
        line = refused_in_one_line(proc, files[case].parent)
        assert line.startswith(f"tune-launch: error: model.config_path ({files[case]})"), line
        assert FILE_CASES[case][1] in line, line
