"""Consolidation of real 2-process CPU checkpoints (fsdp, zero2, zero3, LoRA) against the reference tools.

Each profile trains a tiny Llama for 2 steps through `tune-launch --cpu --num-processes 2` (checkpoint
at step 2, and the trainer's own gathered `final/` model at the same step). The consolidated output
must equal zero_to_fp32's state dict / `accelerate merge-weights` tensor for tensor, load with
AutoModelForCausalLM.from_pretrained, and give logits equal to the trained model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_LLAMA, check_ok, launch, tiny_config, write_yaml

pytestmark = pytest.mark.slow
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
RUNS = {  # name: (profile, tied embeddings, lora, save_steps)
    "fsdp": ("fsdp", True, None, 2),
    "zero2": ("zero2", True, None, 2),
    "zero3": ("zero3", False, None, 1),
    "lora": ("fsdp", False, LORA, 2),
    "zero3-offload": ("zero3-offload", False, None, 2),
    "zero1": ("zero1", False, None, 2),
    "lora-zero3": ("zero3", False, LORA, 2),  # LoRA under ZeRO-3: partitioned adapters, frozen base weights  # no shipped profile: zero2's exact command with a stage-1 DeepSpeed config
}


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The session's tiny Llama with tied input/output embeddings (same tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-tied")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **{**TINY_LLAMA, "tie_word_embeddings": True})
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tied_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Output folders of the four 2-process trainings (2 steps each)."""
    tmp = tmp_path_factory.mktemp("consolidate-runs")
    out = {}
    for name, (profile, tied, lora, save_steps) in RUNS.items():
        cfg = tiny_config(tied_model_dir if tied else tiny_model_dir, tmp / name, train={"max_steps": 2},
                          checkpoint={"save_steps": save_steps}, eval={"eval_steps": 1000})
        if lora:
            cfg["model"]["lora"] = lora
        path = write_yaml(tmp / f"{name}.yaml", cfg)
        check_ok(_launch_zero1(path, tmp) if profile == "zero1" else launch(path, profile=profile, processes=2, timeout=300))
        out[name] = tmp / name
    return out


def _launch_zero1(config: Path, tmp: Path) -> subprocess.CompletedProcess:
    """Run the command `tune-launch --dry-run` prints for zero2 on 2 CPU processes, with stage 1 in the DeepSpeed file."""
    import os
    import shlex

    ds = json.loads((ROOT / "deepspeed_configs" / "zero2.json").read_text())
    ds["zero_optimization"]["stage"] = 1
    (tmp / "zero1.json").write_text(json.dumps(ds))
    plan = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2", "--profile", "zero2",
                           "--dry-run", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    check_ok(plan)
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    lines = plan.stdout.splitlines()
    for line in lines:
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    argv = shlex.split(next(line for line in lines if "accelerate.commands.launch" in line))
    i = argv.index("--deepspeed_config_file")
    assert argv[i + 1].endswith("zero2.json")
    argv[i + 1] = str(tmp / "zero1.json")
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _consolidate(src: Path, dst: Path, **kw):
    from tune_launch.launch.consolidation import consolidate_checkpoint

    return consolidate_checkpoint(src, dst, progress=None, **kw)


def _load_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return sd


def _logits(model_dir: Path, peft_adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if peft_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_adapter)).merge_and_unload()
    model.eval()
    ids = torch.arange(3, 3 + 2 * 24).reshape(2, 24) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same(ours: dict, ref: dict, ties: dict[str, str]) -> None:
    import torch

    assert set(ours) | set(ties) == set(ref), f"keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for k, v in ref.items():
        got = ours[ties.get(k, k)]
        assert got.dtype == v.dtype and torch.equal(got, v), f"{k} differs from the reference tool"


def test_zero_stages_equal_zero_to_fp32_and_trained_logits(runs, tmp_path):
    """ZeRO-1, ZeRO-2 (tied), ZeRO-3 and ZeRO-3 with CPU offload: every tensor equals zero_to_fp32's."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for name, tied in (("zero3", False), ("zero2", True), ("zero1", False), ("zero3-offload", False)):
        ckpt = runs[name] / "checkpoint-2"
        result = _consolidate(ckpt, tmp_path / name, dtype="fp32", verify=True, max_shard_size="40KB")
        stage = name.split("-")[0]
        assert result.format == f"deepspeed-{stage}" and result.ranks == 2 and result.verified
        assert len(result.files) > 1  # the 40KB limit split the model into several files
        ours = _load_dir(tmp_path / name)
        ref = {k: v.contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}
        ties = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
        assert result.tied == ties and ("lm_head.weight" in ours) is not tied
        _assert_same(ours, ref, ties)
        assert torch.equal(_logits(tmp_path / name), _logits(runs[name] / "final"))
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        assert set(index["metadata"]["sha256"]) == set(index["weight_map"].values())
        assert (tmp_path / name / "tokenizer.json").is_file() and (tmp_path / name / "config.json").is_file()


def test_streaming_path_imports_no_torch(runs, tmp_path):
    """Untied ZeRO-3 and FSDP checkpoints consolidate (bf16, so with conversion) without importing torch:
    its ~1.5 s import would cost more than streaming a 1 GB model (bench/consolidate.py)."""
    for name in ("zero3", "lora"):  # the LoRA run's checkpoint written as an adapter folder is FSDP, untied
        code = ("import sys; from tune_launch.launch.consolidation import consolidate_checkpoint; "
                f"r = consolidate_checkpoint({str(runs[name] / 'checkpoint-2')!r}, {str(tmp_path / name)!r}, dtype='bf16', "
                "progress=None, verify=False); print(r.format, r.tensors, 'torch' in sys.modules)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        check_ok(proc)
        fmt, tensors, imported = proc.stdout.split()
        assert fmt.startswith(("deepspeed-zero3", "fsdp-dcp")) and int(tensors) > 0 and imported == "False"


def test_fsdp_tied_equals_accelerate_merge_weights_and_trained_logits(runs, tmp_path):
    import torch
    from accelerate.utils import merge_fsdp_weights

    ckpt = runs["fsdp"] / "checkpoint-2"
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "consolidate", str(ckpt), str(tmp_path / "hf"),
                           "--dtype", "fp32", "--verify", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    check_ok(proc)
    result = json.loads(proc.stdout)
    assert result["format"] == "fsdp-dcp" and result["verified"] and result["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    merge_fsdp_weights(str(ckpt / "pytorch_model_fsdp_0"), str(tmp_path / "ref"))
    ref = _load_dir(tmp_path / "ref")
    ours = _load_dir(tmp_path / "hf")
    _assert_same(ours, ref, result["tied"])
    assert torch.equal(_logits(tmp_path / "hf"), _logits(runs["fsdp"] / "final"))
    # bf16 output: the same values rounded once, and the config says so
    bf = _consolidate(ckpt, tmp_path / "bf16", dtype="bf16")
    assert bf.bytes * 2 == result["bytes"]
    for k, v in _load_dir(tmp_path / "bf16").items():
        assert torch.equal(v, ours[k].to(torch.bfloat16)), k
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("run", ["lora", "lora-zero3"])
def test_lora_adapter_folder_and_merge(runs, tmp_path, run):
    """FSDP and ZeRO-3 LoRA checkpoints: the adapter folder equals what peft saved at the same step; the merge
    gives the logits of peft's merge_and_unload."""
    import torch
    from safetensors.torch import load_file

    ckpt, final = runs[run] / "checkpoint-2", runs[run] / "final"
    adapter = _consolidate(ckpt, tmp_path / "adapter", dtype="fp32")
    assert adapter.kind == "adapter"
    ref = load_file(str(final / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    merged = _consolidate(ckpt, tmp_path / "merged", dtype="fp32", merge_lora=True, verify=True)
    assert merged.kind == "model" and merged.merged_lora == 4  # q_proj and v_proj in each of 2 layers
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    expected = _logits(Path(base), peft_adapter=final)
    assert torch.allclose(_logits(tmp_path / "merged"), expected, atol=1e-5, rtol=0)
    assert torch.equal(_logits(Path(base), peft_adapter=tmp_path / "adapter"), expected)


def test_errors_name_the_file(runs, tmp_path):
    from tune_launch.launch.consolidation import ConsolidateError

    def copy(name: str, step: int = 2) -> Path:
        dst = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(runs[name] / f"checkpoint-{step}", dst)
        return dst

    c = copy("fsdp")
    (c / "pytorch_model_fsdp_0" / "__1_0.distcp").unlink()
    with pytest.raises(ConsolidateError, match=r"missing rank file .*__1_0\.distcp"):
        _consolidate(c, tmp_path / "o1")
    c = copy("zero3")
    (c / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ConsolidateError, match=r"missing rank file .*zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        _consolidate(c, tmp_path / "o2")
    c = copy("zero3")
    f = c / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConsolidateError, match=r"truncated .*zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        _consolidate(c, tmp_path / "o3")
    c = copy("fsdp")
    f = c / "pytorch_model_fsdp_0" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ConsolidateError, match=r"truncated shard .*__0_0\.distcp"):
        _consolidate(c, tmp_path / "o4")
    c = copy("zero3")  # rank 1's optimizer file from the step-1 save of the same run
    shutil.copyfile(runs["zero3"] / "checkpoint-1" / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                    c / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ConsolidateError, match=r"different steps"):
        _consolidate(c, tmp_path / "o5")
    c = copy("zero3")
    shutil.copyfile(runs["zero3"] / "checkpoint-1" / "global_step1" / "zero_pp_rank_1_mp_rank_00_model_states.pt",
                    c / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(ConsolidateError, match=r"different saves"):
        _consolidate(c, tmp_path / "o6")
    c = copy("fsdp")  # a rank file of another run (the LoRA run) in this run's folder
    shutil.copyfile(runs["lora"] / "checkpoint-2" / "pytorch_model_fsdp_0" / "__1_0.distcp", c / "pytorch_model_fsdp_0" / "__1_0.distcp")
    with pytest.raises(ConsolidateError, match=r"__1_0\.distcp.*(different save|does not belong)"):
        _consolidate(c, tmp_path / "o7")
    assert not list(tmp_path.glob(".o*"))  # no temporary folder left behind


def test_cli_refuses_overwrite_and_one_line_errors(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = [sys.executable, "-m", "tune_launch.launch.cli", "consolidate", str(runs["zero2"] / "checkpoint-2"), str(out), "--dtype", "bf16"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (out / "keep.txt").exists()
    proc = subprocess.run([*argv, "--force"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    check_ok(proc)
    assert proc.stdout.startswith("consolidated deepspeed-zero2 (2 ranks)") and not (out / "keep.txt").exists()
    assert json.loads((out / "consolidation.json").read_text())["dtype"] == "bfloat16"

    # A write that fails midway (here the file-size limit, EFBIG; a full disk is the same path): one line naming
    # the cause, the previous output untouched, no temporary folder left behind.
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    before = (out / "consolidation.json").read_bytes()
    proc = subprocess.run([*argv[:-2], "--dtype", "fp32", "--force"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=small_files)
    assert proc.returncode == 2 and "File too large" in proc.stderr and "nothing was replaced" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (out / "consolidation.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
