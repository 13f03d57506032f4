"""Every preflight check: the bad combination gives an error naming the fix, the fixed one passes.

Checks are pure (typed config, plan, hardware, injected `Probes`); the probes themselves are tested
on this machine for real: a bound port, a read-only filesystem, a 30 GiB sparse data file.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from launch_helpers import HARDWARE, training_yaml

from tune_launch.launch.hardware import hardware_from_dict
from tune_launch.launch.plan import LaunchRequest, make_plan
from tune_launch.launch.preflight import (
    Finding, PreflightError, Probes, evaluate, filesystem_type, format_findings, gather_probes, raise_on_errors,
    run_preflight,
)
from tune_launch.training.config import load_config

FACTS: dict[str, object] = {}


def facts_for(cfg):
    from tune_launch.launch.model_facts import model_facts

    key = (cfg.model.config_path, cfg.model.lora is not None)
    if key not in FACTS:
        FACTS[key] = model_facts(cfg.model)
    return FACTS[key]


def setup(tmp_path, model="llama-125m", mode="full", profile="ddp", hw="8x80", overrides=(), request=None, **train):
    path = training_yaml(tmp_path, model, mode, **train)
    cfg = load_config(path, list(overrides))
    hardware = hardware_from_dict(HARDWARE[hw])
    req = dict(config_path=path, overrides=tuple(overrides), profile=profile, hardware_given=True, main_process_port=29611)
    if hw == "cpu":
        req.update(cpu=True, num_processes=2)
    req.update(request or {})
    facts = None if hw == "cpu" else facts_for(cfg)
    return cfg, make_plan(LaunchRequest(**req), cfg, hardware, facts), hardware


def train_with(cfg, **fields):
    """The config with extra train.* values (fields the schema may not have yet are set the same way)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=fields)})


def replanned(cfg, plan):
    """The plan's settings resolved again for an edited config, as the launcher would have resolved them."""
    from tune_launch.launch.plan import device_facts, Placement
    from tune_launch.training.settings import resolve_settings

    dev = device_facts(Placement(plan.device, plan.processes_per_node, plan.nodes), hardware_from_dict(HARDWARE["8x80"]))
    settings = resolve_settings(cfg, dev, plan.profile, micro_batch_size=plan.settings.micro_batch_size,
                                gradient_checkpointing=plan.settings.gradient_checkpointing)
    return replace(plan, settings=settings)


def quant_with(cfg, **fields):
    model = cfg.model.model_copy(update={"quantization": cfg.model.quantization.model_copy(update=fields)})
    return cfg.model_copy(update={"model": model})


def shipped(plan) -> Probes:
    acc = yaml.safe_load(plan.profile.accelerate_config_path.read_text())
    ds = json.loads(plan.profile.deepspeed_config_path.read_text()) if plan.profile.deepspeed_config_path else {}
    return Probes(accelerate_config=acc, deepspeed_config=ds)


def ids(findings: list[Finding], severity="error") -> list[str]:
    return [f.check for f in findings if f.severity == severity]


# --------------------------------------------------------------------------- QLoRA + FSDP / ZeRO-3

def test_qlora_fsdp_needs_quant_storage_matching_compute_dtype(tmp_path):
    cfg, plan, hw = setup(tmp_path, mode="qlora", profile="fsdp")
    bad = evaluate(cfg, plan, hw, shipped(plan))
    assert ids(bad) == ["qlora-fsdp"]
    assert "quant_storage (uint8)" in bad[0].message and bad[0].fix == "set model.quantization.quant_storage: bfloat16"
    good = quant_with(cfg, quant_storage="bfloat16")
    assert evaluate(good, plan, hw, shipped(plan)) == []


def test_qlora_zero3_needs_storage_init_flag_and_one_dtype(tmp_path):
    cfg, plan, hw = setup(tmp_path, mode="qlora", profile="zero3")
    probes = shipped(plan)
    assert ids(evaluate(cfg, plan, hw, probes)) == ["qlora-zero3"]
    fixed = quant_with(cfg, quant_storage="bfloat16")
    assert evaluate(fixed, plan, hw, probes) == []
    no_init = replace(probes, accelerate_config={**probes.accelerate_config, "deepspeed_config": {"zero3_init_flag": False}})
    found = evaluate(fixed, plan, hw, no_init)
    assert ids(found) == ["qlora-zero3"] and "zero3_init_flag: true" in found[0].fix
    fp16 = train_with(fixed, precision="fp16")
    found = evaluate(fp16, replanned(fp16, plan), hw, probes)
    assert ids(found) == ["qlora-zero3"] and "train.precision" in found[0].fix
    _, zero2, _ = setup(tmp_path, mode="qlora", profile="zero2")
    assert evaluate(cfg, zero2, hw, shipped(zero2)) == []  # ZeRO-2 does not partition parameters


# --------------------------------------------------------------------------- gradient checkpointing

def test_reentrant_checkpointing_with_zero3(tmp_path):
    cfg, plan, hw = setup(tmp_path, profile="zero3", gradient_checkpointing=True)
    bad = train_with(cfg, gradient_checkpointing_kwargs={"use_reentrant": True})
    found = evaluate(bad, plan, hw, shipped(plan))
    assert ids(found) == ["checkpointing-zero3"] and "use_reentrant: false" in found[0].fix
    assert evaluate(cfg, plan, hw, shipped(plan)) == []  # non-reentrant (transformers' default) is fine
    no_gc = train_with(bad, gradient_checkpointing=False)
    assert evaluate(no_gc, replanned(no_gc, plan), hw, shipped(plan)) == []
    _, ddp, _ = setup(tmp_path, profile="ddp", gradient_checkpointing=True)
    assert evaluate(bad, ddp, hw, shipped(ddp)) == []


def test_checkpointing_resolved_from_auto_counts(tmp_path):
    cfg, plan, hw = setup(tmp_path, profile="zero3", gradient_checkpointing=True)
    auto = train_with(cfg, gradient_checkpointing="auto", gradient_checkpointing_kwargs={"use_reentrant": True})
    on = replace(plan, settings=replace(plan.settings, gradient_checkpointing=True))  # what the memory plan chose
    off = replace(plan, settings=replace(plan.settings, gradient_checkpointing=False))
    assert ids(evaluate(auto, on, hw, shipped(plan))) == ["checkpointing-zero3"]
    assert evaluate(auto, off, hw, shipped(plan)) == []


def test_checkpointing_twice_deepspeed_json_and_fsdp_config(tmp_path):
    cfg, plan, hw = setup(tmp_path, profile="zero3", gradient_checkpointing=True)
    probes = shipped(plan)
    twice = replace(probes, deepspeed_config={**probes.deepspeed_config, "activation_checkpointing": {"partition_activations": True}})
    assert ids(evaluate(cfg, plan, hw, twice)) == ["checkpointing-zero3"]
    _, fsdp, _ = setup(tmp_path, profile="fsdp", gradient_checkpointing=True)
    probes = shipped(fsdp)
    assert evaluate(cfg, fsdp, hw, probes) == []
    both = replace(probes, accelerate_config={**probes.accelerate_config, "fsdp_config": {"fsdp_activation_checkpointing": True}})
    assert ids(evaluate(cfg, fsdp, hw, both)) == ["checkpointing-fsdp"]


# --------------------------------------------------------------------------- global batch

def test_global_batch_no_accumulation_can_give(tmp_path):
    cfg, plan, hw = setup(tmp_path, profile="ddp")  # micro 1, 8 GPUs
    found = evaluate(train_with(cfg, global_batch_size=100), plan, hw, Probes())
    assert ids(found) == ["global-batch"]
    assert "100 is not a multiple of micro batch 1 x 8 processes = 8" in found[0].message
    assert found[0].fix == "use train.global_batch_size 96 or 104, or 1, 2, 4, 5 or 10 processes"
    assert evaluate(train_with(cfg, global_batch_size=128), plan, hw, Probes()) == []


def test_global_batch_fixes_the_accumulation_the_yaml_gives(tmp_path):
    """The YAML's accumulation (4) is recomputed from the global batch, not refused: 16 = 1 x 8 x 2."""
    cfg, plan, hw = setup(tmp_path, profile="ddp", gradient_accumulation_steps=4, global_batch_size=16)
    assert plan.rank_overrides[-1] == "train.gradient_accumulation_steps=2"
    assert "train.gradient_accumulation_steps 4 -> 2: keeps train.global_batch_size 16 on 8 process(es)" in plan.notes
    assert evaluate(cfg, plan, hw, Probes()) == []
    found = evaluate(train_with(cfg, global_batch_size=12), plan, hw, Probes())  # micro 1 x 8 does not divide 12
    assert ids(found) == ["global-batch"] and "train.global_batch_size 8 or 16" in found[0].fix


def test_auto_micro_batch_is_lowered_to_split_the_global_batch(tmp_path):
    """The memory plan's micro batch for 125M on 80 GiB is larger than 12; 96 over 8 GPUs needs 12 per GPU."""
    cfg, plan, hw = setup(tmp_path, profile="ddp", micro_batch_size="auto", global_batch_size=96)
    assert "train.micro_batch_size=12" in plan.rank_overrides and plan.rank_overrides[-1] == "train.gradient_accumulation_steps=1"
    assert plan.settings.micro_batch_size == 12 and evaluate(cfg, plan, hw, Probes()) == []


# --------------------------------------------------------------------------- port

def test_port_in_use_is_an_error_on_node_zero(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg, plan, hw = setup(tmp_path, hw="cpu", request={"main_process_port": port})
        probes = gather_probes(cfg, plan, {})
        assert probes.port_in_use is True
        found = evaluate(cfg, plan, hw, probes)
        assert ids(found) == ["port"] and f"--main-process-port {port} is already in use" in found[0].message
    assert gather_probes(cfg, plan, {}).port_in_use is False
    assert evaluate(cfg, plan, hw, gather_probes(cfg, plan, {})) == []


def test_port_checked_only_where_it_is_bound(tmp_path):
    cfg, plan, hw = setup(tmp_path, hw="2x8x80", request={"node_rank": 1, "main_process_ip": "10.0.0.1"})
    assert evaluate(cfg, plan, hw, Probes(port_in_use=True)) == []  # node 0 binds it, not this node


# --------------------------------------------------------------------------- output folder

def test_output_dir_not_writable(tmp_path):
    cfg, plan, hw = setup(tmp_path, hw="cpu", overrides=("output_dir=/proc/tune-launch-out",))
    probes = gather_probes(cfg, plan, {})  # /proc is read-only even for root
    assert probes.output_writable is False and probes.output_probe_path == "/proc"
    found = evaluate(cfg, plan, hw, probes)
    assert ids(found) == ["output-dir"] and "cannot write in /proc" in found[0].message
    cfg, plan, hw = setup(tmp_path, hw="cpu", overrides=(f"output_dir={tmp_path}/new/run",))
    probes = gather_probes(cfg, plan, {})
    assert probes.output_writable is True and probes.output_probe_path == str(tmp_path.resolve())
    assert not (tmp_path / "new").exists()  # probing creates nothing
    assert evaluate(cfg, plan, hw, probes) == []


def test_multi_node_output_dir_must_be_shared(tmp_path):
    cfg, plan, hw = setup(tmp_path, hw="2x8x80", profile="fsdp", request={"main_process_ip": "10.0.0.1"})
    local = Probes(output_writable=True, output_fs_type="ext4")
    found = evaluate(cfg, plan, hw, local)
    assert ids(found) == ["output-dir"] and "local ext4 filesystem" in found[0].message
    assert evaluate(cfg, plan, hw, replace(local, output_fs_type="nfs4")) == []
    assert evaluate(cfg, plan, hw, replace(local, output_fs_type="lustre")) == []
    assert evaluate(cfg, plan, hw, replace(local, env={"TUNE_LAUNCH_SHARED_FS": "1"})) == []
    _, one_node, _ = setup(tmp_path, hw="8x80", profile="fsdp")
    assert evaluate(cfg, one_node, hw, local) == []


def test_filesystem_type_uses_the_longest_mount_point():
    mounts = ("overlay / overlay rw 0 0\n10.0.0.5:/export /shared nfs4 rw 0 0\n"
              "/dev/sda1 /shared/local ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n")
    assert filesystem_type(Path("/shared/runs/a"), mounts) == "nfs4"
    assert filesystem_type(Path("/shared/local/x"), mounts) == "ext4"
    assert filesystem_type(Path("/sharedx"), mounts) == "overlay"
    assert filesystem_type(Path("/tmp"), mounts) == "tmpfs"


# --------------------------------------------------------------------------- disk

def test_free_disk_below_one_checkpoint(tmp_path):
    cfg, plan, hw = setup(tmp_path, model="llama-2-7b", profile="zero3")
    facts = facts_for(cfg)
    probes = Probes(num_params=facts.num_params)
    small = replace(hw, disk_free_gib=50.0)  # 6.7e9 params x (2 + 4 + 8 + 2) bytes ~ 100 GiB
    found = evaluate(cfg, plan, small, probes)
    assert ids(found) == ["disk"] and "one checkpoint needs about 100" in found[0].message
    assert evaluate(cfg, plan, replace(hw, disk_free_gib=2000.0), probes) == []
    tight = evaluate(cfg, plan, replace(hw, disk_free_gib=200.0), probes)  # 3 kept + 1 being written
    assert ids(tight) == [] and ids(tight, "warning") == ["disk"]
    lora_cfg, lora_plan, _ = setup(tmp_path, model="llama-2-7b", mode="lora", profile="zero3")
    lora = facts_for(lora_cfg)
    assert evaluate(lora_cfg, lora_plan, small, Probes(num_params=lora.num_params, trainable_params=lora.lora_params)) == []


# --------------------------------------------------------------------------- data preparation vs the waiting ranks

def data_with(cfg, **fields):
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=fields)})


def test_data_prep_longer_than_the_waiting_ranks_allow(tmp_path):
    cfg, plan, hw = setup(tmp_path, hw="cpu")
    big = tmp_path / "data.jsonl"
    with open(big, "r+b") as f:  # 30 GiB sparse: the probe reads sizes, never the data
        f.truncate(30 * 1024**3)
    probes = gather_probes(cfg, plan, {"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert probes.data_bytes == 30 * 1024**3 and probes.data_prepared is False
    assert evaluate(cfg, plan, hw, probes) == []  # ~2 h fits the default data.prepare_timeout (6 h)
    short = data_with(cfg, prepare_timeout=1800)
    found = evaluate(short, plan, hw, probes)
    assert ids(found) == ["data-prep"]
    assert "wait at most data.prepare_timeout (30 min)" in found[0].message
    assert "tune-launch prepare" in found[0].fix and "raise data.prepare_timeout to at least" in found[0].fix
    assert evaluate(short, plan, hw, replace(probes, data_prepared=True)) == []  # a cache hit takes no time
    assert evaluate(data_with(short, streaming=True), plan, hw, probes) == []  # nothing is prepared up front
    assert evaluate(short, plan, hw, replace(probes, data_bytes=100 * 1024**2)) == []
    one, one_plan, _ = setup(tmp_path, hw="cpu", request={"num_processes": 1, "profile": "cpu"})
    assert evaluate(data_with(one, prepare_timeout=1800), one_plan, hw, probes) == []  # nobody waits on one process


def test_data_prep_on_gpus_warns_to_prepare_on_a_cpu_first(tmp_path):
    cfg, plan, hw = setup(tmp_path)
    found = evaluate(cfg, plan, hw, Probes(data_bytes=30 * 1024**3))
    assert ids(found) == [] and ids(found, "warning") == ["data-prep"]
    assert "GPU(s) idle" in found[0].message and "tune-launch prepare" in found[0].fix
    assert evaluate(cfg, plan, hw, Probes(data_bytes=30 * 1024**3, data_prepared=True)) == []


# --------------------------------------------------------------------------- entry points

def test_raise_on_errors_is_one_line_and_returns_warnings():
    err = Finding("port", "error", "port 1 busy", "pick another")
    err2 = Finding("disk", "error", "disk full", "free some")
    warn = Finding("disk", "warning", "tight", "lower save_total_limit")
    assert raise_on_errors([warn]) == [warn]
    with pytest.raises(PreflightError) as e:
        raise_on_errors([err, warn])
    assert str(e.value) == "preflight port: port 1 busy; fix: pick another" and e.value.exit_code == 2
    with pytest.raises(PreflightError, match=r"^2 preflight checks failed: preflight port: .* \| preflight disk: ") as e:
        raise_on_errors([err, err2])
    assert "\n" not in str(e.value)
    assert format_findings([]) == "preflight ok: no known-bad combination"


def test_run_preflight_on_a_clean_cpu_rehearsal(tmp_path):
    cfg, plan, hw = setup(tmp_path, hw="cpu", profile="zero2")
    assert run_preflight(cfg, plan, hw, {}) == []


def test_shipped_profiles_pass_with_a_sound_qlora_config(tmp_path):
    """The shipped accelerate/DeepSpeed files never trip a check on their own."""
    for profile in ("ddp", "fsdp", "zero2", "zero3"):
        cfg, plan, hw = setup(tmp_path, mode="qlora", profile=profile, gradient_checkpointing=True)
        assert evaluate(quant_with(cfg, quant_storage="bfloat16"), plan, hw, shipped(plan)) == [], profile


def test_preflight_reads_the_yaml_fields_end_to_end(tmp_path, capsys):
    """The schema carries the fields the checks read: a real dry-run refuses a global batch 2 processes cannot make."""
    from tune_launch.launch.cli import dispatch

    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: {config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                   " num_attention_heads: 2}}\ntokenizer: {train_vocab_size: 300}\ndata: {generate: {kind: pretrain}}\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    argv = ["--dry-run", "--cpu", "--num-processes", "2", "--profile", "ddp", str(cfg), "train.micro_batch_size=4"]
    assert dispatch(argv + ["train.global_batch_size=8"], {}) == 0
    capsys.readouterr()
    assert dispatch(argv + ["train.global_batch_size=9"], {}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preflight global-batch" in err[0] and "train.global_batch_size 9" in err[0]


def test_a_killed_deepspeed_build_lock_is_found_in_both_folder_layouts(tmp_path):
    import os

    from tune_launch.launch.build_locks import STALE_AFTER_S, stale_build_locks

    def lock(path: Path, age_s: float) -> Path:
        path.parent.mkdir(parents=True)
        path.touch()
        t = path.stat().st_mtime - age_s
        os.utime(path, (t, t))
        return path

    old = lock(tmp_path / "ext" / "deepspeed_shm_comm" / "lock", STALE_AFTER_S + 60)
    lock(tmp_path / "ext" / "cpu_adam" / "lock", 30)  # a build running now
    assert stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}) == (str(old),)
    home_old = lock(tmp_path / "home" / ".cache" / "torch_extensions" / "py311_cpu" / "fused_adam" / "lock", STALE_AFTER_S + 1)
    assert stale_build_locks({"HOME": str(tmp_path / "home")}) == (str(home_old),)
    assert stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path / "none")}) == ()


def test_a_stale_build_lock_stops_a_deepspeed_launch_in_one_line(tmp_path, capsys):
    """Through the real CLI: a DeepSpeed profile refuses (exit 2, the file named); DDP never builds ops, so runs."""
    import os

    from tune_launch.launch.build_locks import STALE_AFTER_S
    from tune_launch.launch.cli import dispatch

    stale = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    t = stale.stat().st_mtime - STALE_AFTER_S - 60
    os.utime(stale, (t, t))
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: {config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
                   " num_attention_heads: 2}}\ntokenizer: {train_vocab_size: 300}\ndata: {generate: {kind: pretrain}}\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    assert dispatch(["--dry-run", "--cpu", "--num-processes", "2", "--profile", "zero2", str(cfg)], env) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and "preflight build-lock" in err[0] and str(stale) in err[0] and f"rm {stale}" in err[0], err
    assert dispatch(["--dry-run", "--cpu", "--num-processes", "2", "--profile", "ddp", str(cfg)], env) == 0
