"""Start-up imports only what the answer needs: no torch to detect a GPU-less machine, and a model config planned
or checked before is served from the facts cache without torch or transformers (launch/facts_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch_helpers import ROOT, training_yaml

from tune_launch.launch import facts_cache
from tune_launch.launch.hardware import _no_gpu_device
from tune_launch.launch.model_facts import checked_model_config, model_facts
from tune_launch.training.config import load_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(facts_cache.CACHE_ENV, str(folder))
    return folder


def _imports_after(code: str, env: dict[str, str]) -> list[str]:
    """Which heavy modules a fresh interpreter has imported after running `code`."""
    probe = code + "\nimport sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_cpu_only_detection_does_not_import_torch():
    if not _no_gpu_device(os.environ):
        pytest.skip("a GPU driver is present here: torch decides")
    code = "from tune_launch.launch.hardware import detect_hardware; assert detect_hardware('.', {}).gpus_per_node == 0"
    assert _imports_after(code, dict(os.environ)) == []
    assert _no_gpu_device({"CUDA_VISIBLE_DEVICES": "", "PATH": os.environ.get("PATH", "")})


def test_facts_are_cached_by_content_and_served_without_torch_or_transformers(tmp_path, cache):
    cfg = load_config(training_yaml(tmp_path, "llama-125m"))
    first = model_facts(cfg.model)
    assert first.num_params > 100_000_000 and len(list((cache / "facts").glob("*.json"))) == 1
    assert model_facts(cfg.model) == first and model_facts(cfg.model, use_cache=False) == first
    assert checked_model_config(cfg.model)["num_hidden_layers"] == 12  # transformers checks it once, then the cache
    code = ("from tune_launch.training.config import load_config; from tune_launch.launch.model_facts import model_facts, "
            f"checked_model_config; c = load_config({str(tmp_path / 'llama-125m-full.yaml')!r}).model; "
            f"assert model_facts(c).num_params == {first.num_params}; assert checked_model_config(c)['model_type'] == 'llama'")
    assert _imports_after(code, {**os.environ, facts_cache.CACHE_ENV: str(cache)}) == []


def test_what_changes_the_key(tmp_path, cache):
    base = load_config(training_yaml(tmp_path, "llama-125m"))
    lora = load_config(training_yaml(tmp_path, "llama-125m", "lora"))
    assert facts_cache.config_key(base.model) == facts_cache.config_key(lora.model)  # same config.json
    assert facts_cache.facts_key(base.model) != facts_cache.facts_key(lora.model)  # adapters change the counts
    assert model_facts(lora.model).lora_params > 0 and model_facts(base.model).lora_params == 0
    copy = tmp_path / "copy" / "config.json"
    copy.parent.mkdir()
    text = (ROOT / "examples" / "models" / "llama-125m" / "config.json").read_text()
    copy.write_text(text)
    moved = base.model.model_copy(update={"config_path": str(copy)})
    assert facts_cache.config_key(moved) == facts_cache.config_key(base.model)  # content, not path
    copy.write_text(text.replace('"num_hidden_layers": 12', '"num_hidden_layers": 11'))
    assert facts_cache.config_key(moved) != facts_cache.config_key(base.model)
    assert facts_cache.config_key(base.model.model_copy(update={"trust_remote_code": True})) is None


def test_a_broken_entry_is_rebuilt_and_a_failed_write_is_harmless(tmp_path, cache, monkeypatch):
    cfg = load_config(training_yaml(tmp_path, "llama-125m"))
    good = model_facts(cfg.model)
    entry = next((cache / "facts").glob("*.json"))
    entry.write_text('{"format": 1, "facts": {"num_params": 1}}')  # a stale shape: missing fields
    assert model_facts(cfg.model) == good
    entry.write_text("{not json")
    assert model_facts(cfg.model) == good and json.loads(entry.read_text())["facts"]["num_params"] == good.num_params
    assert not list(cache.rglob("*.tmp"))
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv(facts_cache.CACHE_ENV, str(blocked))  # mkdir fails: no cache, same answer
    assert model_facts(cfg.model) == good


def test_inline_configs_are_checked_once(tmp_path, cache):
    path = tmp_path / "t.yaml"
    path.write_text("model: {config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                    " num_attention_heads: 2}}\ntokenizer: {train_vocab_size: 300}\ndata: {generate: {kind: pretrain}}\n")
    model = load_config(path).model
    data = checked_model_config(model)
    assert data["hidden_size"] == 32 and data["model_type"] == "llama"
    assert list((cache / "configs").glob("*.json")) and checked_model_config(model) == data


def test_a_llama_layout_config_is_planned_without_torch_even_the_first_time(tmp_path):
    yaml_path = training_yaml(tmp_path, "tinyllama-1.1b")
    code = ("from tune_launch.training.config import load_config; from tune_launch.launch.model_facts import model_facts; "
            f"assert model_facts(load_config({str(yaml_path)!r}).model).num_params > 1_000_000_000")
    assert _imports_after(code, {**os.environ, facts_cache.CACHE_ENV: str(tmp_path / "empty")}) == []


@pytest.mark.slow
def test_another_layout_is_built_on_the_meta_device(tmp_path):
    """The control for the test above: a model the formula does not cover imports torch and transformers."""
    code = ("from tune_launch.training.config import load_config; from tune_launch.launch.model_facts import model_facts; "
            f"assert model_facts(load_config({str(tmp_path / 'gpt2.yaml')!r}).model).num_params > 0")
    gpt2 = tmp_path / "gpt2.yaml"
    gpt2.write_text("model: {config: {model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 2, vocab_size: 300}}\n"
                    "tokenizer: {train_vocab_size: 300}\ndata: {generate: {kind: pretrain}}\n")
    assert _imports_after(code, {**os.environ, facts_cache.CACHE_ENV: str(tmp_path / "empty2")}) == ["torch", "transformers"]


@pytest.mark.slow
def test_startup_bench_plan_smoke(tmp_path):
    """bench/startup.py runs as a module and writes its JSON (plan part only; the launch part trains)."""
    out = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, "-m", "bench.startup", "--skip-launch", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"cached", "uncached", "uncached_meta_build"} <= set(data["plan"]) and data["plan"]["cached"]["wall_s"] > 0
    assert set(data["checks"]) == {"plan_cached_ok", "plan_uncached_ok", "plan_meta_build_ok"} and len(data["plan"]["cached"]["samples"]) == 1
    assert len(data["loadavg_before"]) == 3 and "launch" not in data
    assert "versions" in data and data["device_kind"] == "cpu"
