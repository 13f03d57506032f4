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

    from tune_launch.launch.consolidation.source import FileCache, assemble, SourceTensor, Piece
    from tune_launch.launch.consolidation.torchzip import TensorRef, index_file

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    torch.save({"w": t, "view": t[1:], "evil": Boom(), "n": 7}, tmp_path / "x.pt")
    obj = index_file(tmp_path / "x.pt")
    assert obj["n"] == 7 and type(obj["evil"]).__module__.startswith("stub.")
    ref = obj["view"]
    assert isinstance(ref, TensorRef) and ref.shape == (2, 4) and ref.storage_offset == 4 and ref.dtype == "bfloat16"
    files = FileCache()
    got = assemble(SourceTensor("view", ref.shape, ref.dtype, (Piece(ref, 0, ref.numel),)), files)
    files.close()
    assert got.dtype.name == "uint16" and torch.equal(torch.from_numpy(got.view("int16")).view(torch.bfloat16), t[1:])


def test_header_matches_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file

    from tune_launch.launch.consolidation.plan import OutputTensor, Shard
    from tune_launch.launch.consolidation.writer import write_shards

    data = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16)}
    specs = tuple(OutputTensor(k, tuple(v.shape), str(v.dtype).replace("torch.", ""), k) for k, v in data.items())
    def produce(s, out):
        out[...] = data[s.name].reshape(-1).view(torch.int16 if s.dtype == "bfloat16" else data[s.name].dtype).numpy()
        return out

    hashes = write_shards([Shard("m.safetensors", specs)], tmp_path, produce)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in data.items())
    import hashlib
    assert hashes["m.safetensors"] == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()


def test_shard_plan_and_sizes():
    from tune_launch.launch.consolidation.plan import OutputTensor, parse_size, plan_shards
    from tune_launch.launch.consolidation.source import ConsolidateError

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
        proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "consolidate", str(src), str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_module_imports_no_torch():
    code = "import sys, launch.consolidate; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def _torch_bits(t):
    """A torch tensor's bits as numpy (bf16 -> uint16), to compare with the torch-free conversions."""
    import torch

    return t.view(torch.int16).numpy().view("uint16") if t.dtype == torch.bfloat16 else t.numpy()


def test_dtype_conversions_are_bitwise_torch():
    """fp32/fp16/bf16 in every direction equal torch's .to() bit for bit: rounding ties, subnormals,
    overflow to inf, signed zeros; NaN stays NaN."""
    import numpy as np
    import torch

    from tune_launch.launch.consolidation.arrays import convert

    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, 1e-8, -1e-40, 3.4e38, float("inf"), float("-inf"),
                            1.00390625, 1.01171875, 2.0 ** -133, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8])  # bf16 ties
    raw = torch.randint(0, 2**32 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    fp32 = torch.cat([special, torch.randn(100_000, generator=g) * 1000, raw[~raw.isnan()]])
    sources = {"float32": fp32, "bfloat16": fp32.to(torch.bfloat16), "float16": fp32.to(torch.float16)}
    for src_name, src in sources.items():
        for dst_name in ("float32", "bfloat16", "float16"):
            want = _torch_bits(src.to(getattr(torch, dst_name)))
            got = convert(_torch_bits(src), src_name, dst_name)
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{src_name} -> {dst_name}"
    nan = convert(np.array([np.nan, -np.nan], dtype=np.float32), "float32", "bfloat16")
    assert np.isnan((nan.astype(np.uint32) << 16).view(np.float32)).all()


@pytest.mark.parametrize("direct", [True, False])
def test_writer_streams_odd_offsets_exactly(tmp_path, direct):
    """Tensors of every size around the page (odd byte counts too, so later tensors start unaligned),
    a header over one page, two shards: the safetensors library reads back every tensor, the file is
    exactly as long as its contents, and the recorded SHA-256 is the file's."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from tune_launch.launch.consolidation.plan import OutputTensor, Shard
    from tune_launch.launch.consolidation.writer import PAGE, _FileSink, write_shards

    g = torch.Generator().manual_seed(1)
    data = {"odd_bytes": torch.randint(0, 255, (4097,), generator=g, dtype=torch.uint8),
            "flag": torch.tensor([True, False, True]),
            **{f"layer{i:03d}.w": torch.randn(n, generator=g) for i, n in enumerate([1, 1023, 1024, 1025, 70_000, 3])},
            "bf": torch.randn(333, 7, generator=g).to(torch.bfloat16), "half": torch.randn(5, generator=g).half()}
    specs = tuple(OutputTensor(k, tuple(v.shape), str(v.dtype).replace("torch.", ""), k) for k, v in data.items())
    shards = [Shard("a.safetensors", specs[:5]), Shard("b.safetensors", specs[5:])]

    def produce(s, out):
        out[...] = _torch_bits(data[s.name]).reshape(-1)
        return out

    hashes = write_shards(shards, tmp_path, produce, direct=direct)
    back = {**load_file(str(tmp_path / "a.safetensors")), **load_file(str(tmp_path / "b.safetensors"))}
    assert set(back) == set(data) and all(torch.equal(back[k], v) for k, v in data.items())
    for f in ("a.safetensors", "b.safetensors"):
        raw = (tmp_path / f).read_bytes()
        header = int.from_bytes(raw[:8], "little")
        assert len(raw) == 8 + header + sum(t.nbytes for s in shards if s.file == f for t in s.tensors)
        assert hashes[f] == hashlib.sha256(raw).hexdigest()
    sink = _FileSink(tmp_path / "probe", direct)
    assert sink.align == (PAGE if direct else 1)  # /tmp is ext4 here: O_DIRECT taken when asked
    sink.abort()


@pytest.mark.parametrize("refused_at", ["open", "first write"])
def test_writer_falls_back_to_plain_writes_where_o_direct_is_refused(tmp_path, monkeypatch, refused_at):
    """Filesystems that refuse O_DIRECT (EINVAL at open, or at the first write: some FUSE and network
    mounts; this machine has none, so the refusal is injected) get plain writes and the same bytes."""
    import errno
    import os

    import numpy as np

    from tune_launch.launch.consolidation import writer
    from tune_launch.launch.consolidation.plan import OutputTensor, Shard

    real_open, real_write, refused = os.open, os.write, []

    def fake_open(path, flags, *a):
        if refused_at == "open" and flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def fake_write(fd, data):
        if refused_at == "first write" and not refused and os.fstat(fd).st_size == 0 and len(data) == writer.PAGE:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer.os, "open", fake_open)
    monkeypatch.setattr(writer.os, "write", fake_write)
    spec = OutputTensor("w", (1001,), "float32", "w")
    values = np.arange(1001, dtype=np.float32)

    def produce(s, out):
        out[...] = values
        return out

    writer.write_shards([Shard("m.safetensors", (spec,))], tmp_path, produce)
    assert refused
    monkeypatch.undo()
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(str(tmp_path / "m.safetensors"))["w"], values)


def test_dcp_metadata_read_without_torch_matches_torch(tmp_path):
    """A real torch.distributed.checkpoint save (one process): every tensor's chunk, file and byte range
    read by the restricted unpickler equals torch's own reader; bytes entries are skipped; no torch import."""
    import torch
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(2)
    sd = {"model": {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
                    "steps": torch.tensor(3), "note": "not a tensor"}}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")))
    md = dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    code = ("import sys, json; from pathlib import Path; from tune_launch.launch.consolidation.dcp import read_dcp; "
            f"s = read_dcp(Path({str(tmp_path / 'ck')!r})); "
            "print(json.dumps([[t.name, list(t.shape), t.dtype, [[p.ref.path, p.ref.data_offset, p.count] for p in t.pieces]] "
            "for t in s.tensors])); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed, torch_imported = proc.stdout.strip().splitlines()
    assert torch_imported == "False"
    got = {name: (tuple(shape), dtype, pieces) for name, shape, dtype, pieces in json.loads(listed)}
    assert set(got) == {"w", "b", "steps"}  # "model." dropped as accelerate's wrapper key; the string skipped
    for fqn, meta in md.state_dict_metadata.items():
        if fqn == "model.note":
            continue
        name = fqn.split(".", 1)[1]
        assert got[name][:2] == (tuple(meta.size), str(meta.properties.dtype).replace("torch.", ""))
        infos = [info for idx, info in md.storage_data.items() if idx.fqn == fqn]
        assert len(got[name][2]) == len(infos) == 1
        path, offset, count = got[name][2][0]
        assert path.endswith(infos[0].relative_path) and infos[0].offset <= offset < infos[0].offset + infos[0].length
    from tune_launch.launch.consolidation.dcp import read_dcp
    from tune_launch.launch.consolidation.source import FileCache, assemble

    files = FileCache()
    source = {t.name: t for t in read_dcp(tmp_path / "ck").tensors}
    assert torch.equal(torch.from_numpy(assemble(source["w"], files)), sd["model"]["w"])
    assert torch.equal(torch.from_numpy(assemble(source["b"], files, "float32")), sd["model"]["b"].float())
    files.close()


def test_dcp_metadata_pickle_runs_no_code(tmp_path):
    from tune_launch.launch.consolidation.dcp import read_dcp
    from tune_launch.launch.consolidation.source import ConsolidateError

    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "ran"),))

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConsolidateError, match=r"\.metadata is not torch\.distributed\.checkpoint metadata"):
        read_dcp(tmp_path / "ck")
    assert not (tmp_path / "ran").exists()


def test_region_pieces_convert_in_bounded_blocks(tmp_path, monkeypatch):
    """Chunks split along dim 1 (a box each) and a non-contiguous chunk, converted to bf16 through a
    staging block smaller than one chunk: the result equals torch's conversion of the whole tensor."""
    import numpy as np
    import torch

    from tune_launch.launch.consolidation import source as S
    from tune_launch.launch.consolidation.torchzip import index_file

    monkeypatch.setattr(S, "BLOCK_BYTES", 64)  # 16 fp32 elements: several blocks per chunk, whole rows each
    g = torch.Generator().manual_seed(3)
    full = torch.randn(10, 8, generator=g)
    torch.save({"left": full[:, :3].clone(), "right": full[:, 3:].clone(), "t": full.T.contiguous().T}, tmp_path / "c.pt")
    refs = index_file(tmp_path / "c.pt")
    left = S.Piece(refs["left"], 0, 30, region=((0, 10), (0, 3)))
    right = S.Piece(refs["right"], 0, 50, region=((0, 10), (3, 5)))
    files = S.FileCache()
    got = S.assemble(S.SourceTensor("w", (10, 8), "float32", (left, right)), files, "bfloat16")
    assert np.array_equal(got, _torch_bits(full.to(torch.bfloat16)))
    assert not refs["t"].is_contiguous
    strided = S.assemble(S.SourceTensor("t", (10, 8), "float32", (S.Piece(refs["t"], 0, 80),)), files, "float16")
    assert np.array_equal(strided, full.half().numpy())
    files.close()


def test_known_tie_table_matches_transformers(tmp_path):
    """Every architecture in hf_files.KNOWN_TIES, built tiny on the meta device with tied embeddings, ties
    exactly what the table says; and a config declaring the tie is planned without importing transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tune_launch.launch.consolidation.hf_files import KNOWN_TIES

    types = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
             "Phi3ForCausalLM": "phi3", "GraniteForCausalLM": "granite", "OlmoForCausalLM": "olmo",
             "Olmo2ForCausalLM": "olmo2", "StableLmForCausalLM": "stablelm"}
    assert set(types) == set(KNOWN_TIES)
    for arch, model_type in types.items():
        cfg = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert type(model).__name__ == arch
        ties = {str(k): str(v) for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
        assert ties == KNOWN_TIES[arch], (arch, ties)

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                                      "tie_word_embeddings": True}))
    code = ("import sys; from pathlib import Path; from tune_launch.launch.consolidation.hf_files import tied_keys; "
            f"print(tied_keys(Path({str(tmp_path / 'config.json')!r})), 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "({'lm_head.weight': 'model.embed_tokens.weight'}, None) False", proc.stderr
