"""--verify: re-read what was written and compare it with the source, tensor by tensor.

The safetensors library itself must list exactly the planned names, shapes and dtypes; each file's
SHA-256, computed again from the bytes read back, must equal the one recorded while writing; each
tensor's bytes must equal the source tensor converted again from the shards (bitwise, so NaNs and
signed zeros count too). Bytes are read with positioned reads into one reused buffer, never through a
mapping, so verifying costs no more memory than writing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tune_launch.launch.consolidation.arrays import as_bytes, storage_dtype
from tune_launch.launch.consolidation.hf_source import read_safetensors_file
from tune_launch.launch.consolidation.plan import SAFETENSORS_DTYPES, OutputTensor, Shard
from tune_launch.launch.consolidation.source import ConsolidateError, pread_exact


def _library_view(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) as the safetensors library reads the file (header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        out = {}
        for name in f.keys():
            s = f.get_slice(name)
            out[name] = (tuple(s.get_shape()), s.get_dtype())
        return out


def verify_output(folder: Path, shards: list[Shard], hashes: dict[str, str],
                  produce: Callable[..., object], on_tensor: Callable[[OutputTensor], None] | None = None) -> int:
    """Number of tensors checked; raises ConsolidateError naming the first mismatch."""
    checked = 0
    largest = max((t.nbytes for s in shards for t in s.tensors), default=0)
    got_buf = np.empty(max(largest, 8), dtype=np.uint8)
    want_buf = np.empty(max(largest, 8), dtype=np.uint8)
    for shard in shards:
        path = folder / shard.file
        listed = _library_view(path)
        planned = {t.name: (t.shape, SAFETENSORS_DTYPES[t.dtype]) for t in shard.tensors}
        if set(listed) != set(planned):
            raise ConsolidateError(f"--verify: {shard.file} holds {sorted(set(listed) ^ set(planned))[:3]} unexpectedly")
        for name, want in planned.items():
            if listed[name] != want:
                raise ConsolidateError(f"--verify: {name} reads back as {listed[name]}, expected {want}")
        refs = {t.name: t.pieces[0].ref for t in read_safetensors_file(path)}
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            fd = fh.fileno()
            header_end = min((r.data_offset for r in refs.values()), default=os.fstat(fd).st_size)
            sha.update(os.pread(fd, header_end, 0))
            position = header_end
            for t in sorted(shard.tensors, key=lambda t: refs[t.name].data_offset):
                ref = refs[t.name]
                if ref.data_offset != position or ref.storage_nbytes != t.nbytes:
                    raise ConsolidateError(f"--verify: {t.name} in {shard.file} is not where the plan put it")
                got = got_buf[:t.nbytes]
                if not pread_exact(fd, got, position):
                    raise ConsolidateError(f"--verify: {path} ends before byte {position + t.nbytes}")
                sha.update(got)
                position += t.nbytes
                want = as_bytes(produce(t, want_buf[:t.nbytes].view(storage_dtype(t.dtype))))
                if not np.array_equal(got, want):
                    raise ConsolidateError(f"--verify: {t.name} in {shard.file} differs from the checkpoint")
                checked += 1
                if on_tensor is not None:
                    on_tensor(t)
            trailing = os.fstat(fd).st_size - position
            if trailing:
                raise ConsolidateError(f"--verify: {shard.file} has {trailing} bytes after its last tensor")
        if sha.hexdigest() != hashes.get(shard.file):
            raise ConsolidateError(f"--verify: {shard.file} has SHA-256 {sha.hexdigest()[:12]}..., written as "
                                   f"{str(hashes.get(shard.file))[:12]}...; the disk changed it, do not use this output")
    return checked

