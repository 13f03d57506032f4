"""`trainer:` passthrough: extra TrainingArguments / SFTConfig fields reach the rank's arguments; the field table
comes from the installed dataclasses and is cached, so a YAML with `trainer:` loads without importing them."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tune_launch.training.distributed import RankInfo
from tune_launch.training.passthrough import OWNED, check_trainer_fields, field_table, type_spec, value_problem
from tune_launch.training.schema import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent


def _cfg(**extra) -> TrainingConfig:
    return TrainingConfig.model_validate({"model": {"name_or_path": "org/model"}, "task": "sft",
                                          "data": {"generate": {"kind": "alpaca"}}, **extra})


def test_passed_fields_reach_the_arguments_and_override_the_fast_path(monkeypatch):
    import transformers.training_args as ta
    from trl import SFTConfig

    from tune_launch.profiles import get_profile
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import arguments

    cfg = _cfg(trainer={"torch_empty_cache_steps": 4, "dataloader_pin_memory": False,
                        "train_sampling_strategy": "group_by_length", "label_smoothing_factor": 0.1})
    gpu = DeviceFacts(kind="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, memory_gib=79.2)
    settings = resolve_settings(cfg, gpu, get_profile("single-gpu"))
    kwargs = arguments(cfg, RankInfo(device="cuda", profile="single-gpu"), True, settings, gpu)
    for check in ("is_torch_bf16_gpu_available", "is_torch_tf32_available"):  # no GPU here to answer these
        monkeypatch.setattr(ta, check, lambda: True)
    monkeypatch.setattr(ta, "enable_tf32", lambda on: None)
    args = SFTConfig(**kwargs)
    assert args.torch_empty_cache_steps == 4 and args.train_sampling_strategy == "group_by_length"
    assert args.dataloader_pin_memory is False  # the GPU fast path turns it on; the YAML's passthrough wins
    assert args.label_smoothing_factor == 0.1


def test_every_owned_field_exists_in_the_installed_dataclasses():
    """The owned/renamed tables stay honest when transformers or TRL move fields."""
    fields = set(field_table("SFTConfig"))
    assert set(OWNED) - {"warmup_ratio"} <= fields  # warmup_ratio: gone in transformers 5, kept for the message
    assert "group_by_length" not in fields and "evaluation_strategy" not in fields  # the tutorials' old names


def test_field_table_matches_the_dataclass():
    from transformers import TrainingArguments

    table = field_table("TrainingArguments")
    assert set(table) == {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert table["dataloader_pin_memory"]["kinds"] == ["bool"]
    assert table["torch_empty_cache_steps"]["kinds"] == ["int", "none"]
    assert "group_by_length" in table["train_sampling_strategy"]["choices"]
    assert set(table["log_level"]["choices"]) >= {"warning", "passive"}


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize("tp,spec", [
    (bool, {"kinds": ["bool"]}), (int | None, {"kinds": ["int", "none"]}), (float, {"kinds": ["float"]}),
    (Color | str, {"kinds": ["str"], "choices": ["blue", "red"]}), (typing.Literal["a", "b"], {"kinds": ["str"], "choices": ["a", "b"]}),
    (dict | str | None, {"kinds": ["dict", "none", "str"]}), (list[str] | None, {"kinds": ["list", "none"]}),
    (typing.Callable, {"kinds": ["any"]}),
])
def test_type_spec(tp, spec):
    assert type_spec(tp) == spec


@pytest.mark.parametrize("spec,value,problem", [
    ({"kinds": ["bool"]}, "yes", "expects true/false"), ({"kinds": ["bool"]}, True, None),
    ({"kinds": ["int", "none"]}, 1.5, "expects an integer or null"), ({"kinds": ["int"]}, True, "expects an integer"),
    ({"kinds": ["float"]}, 3, None), ({"kinds": ["str"], "choices": ["red", "blue"]}, "green", "expects one of red, blue"),
    ({"kinds": ["any"]}, object(), None),
])
def test_value_problem(spec, value, problem):
    got = value_problem(spec, value)
    assert (got is None) if problem is None else got.startswith(problem)


def test_empty_passthrough_is_not_checked_and_task_picks_the_dataclass():
    check_trainer_fields({}, "pretrain")
    check_trainer_fields({"padding_free": True}, "sft")
    with pytest.raises(ValueError, match="an SFTConfig field"):
        check_trainer_fields({"padding_free": True}, "pretrain")


@pytest.mark.slow  # two interpreters, one importing transformers: ~13 s
def test_cached_table_loads_a_yaml_without_importing_transformers(tmp_path):
    """The launcher reads the YAML first: with the table cached, `trainer:` costs no transformers import."""
    cache = tmp_path / "cache"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "org/model"}, "data": {"generate": {"kind": "pretrain"}},
                                    "trainer": {"torch_empty_cache_steps": 8}}))
    code = ("import sys; from tune_launch.training.config import load_config; load_config(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    first = subprocess.run([sys.executable, "-c", "import json; " + code, str(path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1]) == ["torch", "transformers"]  # first time: read the dataclass
    cached = list((cache / "tune-launch").glob("fields-TrainingArguments-*.json"))
    assert len(cached) == 1 and "torch_empty_cache_steps" in json.loads(cached[0].read_text())
    second = subprocess.run([sys.executable, "-c", "import json; " + code, str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1]) == []
