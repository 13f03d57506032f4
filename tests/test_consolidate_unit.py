"""Consolidation pieces without training: torch.save indexing, safetensors headers, shard plans, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from conftest import ROOT


def test_torchzip_indexes_tensors_without_running_the_pickle(tmp_path):
    import torch

    from launch.consolidation.torchzip import MappedFile, TensorRef, index_file

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    torch.save({"w": t, "view": t[1:], "evil": Boom(), "n": 7}, tmp_path / "x.pt")
    obj = index_file(tmp_path / "x.pt")
    assert obj["n"] == 7 and type(obj["evil"]).__module__.startswith("stub.")
    ref = obj["view"]
    assert isinstance(ref, TensorRef) and ref.shape == (2, 4) and ref.storage_offset == 4 and ref.dtype == "bfloat16"
    f = MappedFile(ref.path)
    assert torch.equal(f.view(ref).reshape(ref.shape), t[1:])
    f.close()


def test_header_matches_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file

    from launch.consolidation.plan import OutputTensor, Shard
    from launch.consolidation.writer import write_shards

    data = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16)}
    specs = tuple(OutputTensor(k, tuple(v.shape), str(v.dtype).replace("torch.", ""), k) for k, v in data.items())
    hashes = write_shards([Shard("m.safetensors", specs)], tmp_path, lambda s, out: out.view(data[s.name].shape).copy_(data[s.name]))
    back = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in data.items())
    import hashlib
    assert hashes["m.safetensors"] == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()


def test_shard_plan_and_sizes():
    from launch.consolidation.plan import OutputTensor, parse_size, plan_shards
    from launch.consolidation.source import ConsolidateError

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    with pytest.raises(ConsolidateError, match="--max-shard-size"):
        parse_size("lots")
    ts = [OutputTensor(f"t{i}", (n,), "float32", f"t{i}") for i, n in enumerate([10, 10, 30, 5])]
    shards = plan_shards(ts, 80)  # 40, 40, 120 (alone, over the limit), 20 bytes
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3"]]
    assert shards[0].file == "model-00001-of-00003.safetensors"


def test_unknown_format_and_missing_folder_are_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights.bin").write_bytes(b"junk")
    for src, msg in ((tmp_path / "ckpt", "unknown checkpoint format"), (tmp_path / "nope", "no such checkpoint folder")):
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "consolidate", str(src), str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_module_imports_no_torch():
    code = "import sys, launch.consolidate; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
