"""--verify: re-read what was written, with the safetensors library itself, and compare with the source.

Each file's SHA-256 must equal the one recorded while writing; each tensor's bytes must equal the
source tensor converted again from the shards (bitwise, so NaNs and signed zeros count too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from launch.consolidation.plan import OutputTensor, Shard
from launch.consolidation.source import ConsolidateError
from launch.consolidation.writer import sha256_file, tensor_bytes


def verify_output(folder: Path, shards: list[Shard], hashes: dict[str, str],
                  produce: Callable[[OutputTensor], object], on_tensor: Callable[[OutputTensor], None] | None = None) -> int:
    """Number of tensors checked; raises ConsolidateError naming the first mismatch."""
    import numpy as np
    from safetensors import safe_open

    checked = 0
    for shard in shards:
        path = folder / shard.file
        digest = sha256_file(path)
        if digest != hashes.get(shard.file):
            raise ConsolidateError(f"--verify: {shard.file} has SHA-256 {digest[:12]}..., written as "
                                   f"{str(hashes.get(shard.file))[:12]}...; the disk changed it, do not use this output")
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            planned = {t.name for t in shard.tensors}
            if names != planned:
                raise ConsolidateError(f"--verify: {shard.file} holds {sorted(names ^ planned)[:3]} unexpectedly")
            for t in shard.tensors:
                got = f.get_tensor(t.name)
                if tuple(got.shape) != t.shape or str(got.dtype) != f"torch.{t.dtype}":
                    raise ConsolidateError(f"--verify: {t.name} reads back as {tuple(got.shape)} {got.dtype}, "
                                           f"expected {t.shape} {t.dtype}")
                if not np.array_equal(tensor_bytes(got), tensor_bytes(produce(t))):
                    raise ConsolidateError(f"--verify: {t.name} in {shard.file} differs from the checkpoint")
                checked += 1
                if on_tensor is not None:
                    on_tensor(t)
    return checked
