"""What every checkpoint reader produces: each full tensor as a list of byte ranges in shard files.

A reader only plans (names, shapes, where each piece lives); `assemble` is the one place that reads,
one tensor at a time, so memory stays at one tensor whatever the model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from launch.consolidation.torchzip import MappedFile, TensorRef
from launch.errors import TuneLaunchError


class ConsolidateError(TuneLaunchError):
    """A checkpoint that cannot be consolidated, or an output that cannot be written: names the file and the fix."""


@dataclass(frozen=True)
class Piece:
    """`count` elements of `ref` from element `start`, landing at flat position `dest` of the full tensor,
    or, when `region` is set (a chunk not split along dim 0), in that box ((offset, size) per dim)."""

    ref: TensorRef
    start: int
    count: int
    dest: int = 0
    region: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Source:
    """A checkpoint, planned: its format, tensors in saved order, and ties it records (target -> source)."""

    format: str
    path: Path
    tensors: list[SourceTensor]
    ties: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def by_name(self) -> dict[str, SourceTensor]:
        return {t.name: t for t in self.tensors}


def check_coverage(t: SourceTensor) -> None:
    """Every element of a tensor must come from exactly the pieces listed (catches odd partitioning)."""
    got = sum(p.count for p in t.pieces)
    if got != t.numel:
        raise ConsolidateError(f"tensor {t.name}: the shards hold {got} of its {t.numel} elements; "
                               "the checkpoint is incomplete or its files come from different runs")


def check_bounds(tensors: list[SourceTensor]) -> None:
    """Every byte range must lie inside its file: a shorter file is a truncated shard."""
    sizes: dict[str, int] = {}
    for t in tensors:
        for p in t.pieces:
            from launch.consolidation.torchzip import ITEMSIZE

            end = p.ref.data_offset + (p.ref.storage_offset + p.start + p.count) * ITEMSIZE[p.ref.dtype]
            size = sizes.setdefault(p.ref.path, Path(p.ref.path).stat().st_size)
            if end > size:
                raise ConsolidateError(f"truncated shard {p.ref.path}: {t.name} needs {end} bytes, the file has {size}; "
                                       "copy the file again or use an earlier checkpoint")


class FileCache:
    """Shard files mapped once each for the whole run."""

    def __init__(self) -> None:
        self._files: dict[str, MappedFile] = {}

    def get(self, path: str) -> MappedFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = MappedFile(path)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def assemble(t: SourceTensor, files: FileCache, dtype=None):
    """The full tensor, converted to `dtype` while copying (one pass, one output-sized buffer)."""
    import torch

    out_dtype = dtype or getattr(torch, t.dtype)
    flat = torch.empty(t.numel, dtype=out_dtype)
    for p in t.pieces:
        f = files.get(p.ref.path)
        if p.ref.is_contiguous:
            src = f.view(p.ref, p.start, p.count)
        else:
            full = f.view(TensorRef(p.ref.path, p.ref.data_offset, p.ref.storage_nbytes, p.ref.dtype,
                                    (p.ref.storage_nbytes // max(1, _item(p.ref)),), (1,), 0))
            src = full.as_strided(p.ref.shape, p.ref.stride, p.ref.storage_offset).reshape(-1)[p.start:p.start + p.count]
        if p.region is None:
            flat[p.dest:p.dest + p.count].copy_(src)
        else:
            box = flat.view(t.shape)[tuple(slice(o, o + s) for o, s in p.region)]
            box.copy_(src.view(tuple(s for _, s in p.region)))
        del src
        if p.ref.is_contiguous:
            f.release(p.ref, p.start, p.count)
    return flat.view(t.shape)


def _item(ref: TensorRef) -> int:
    from launch.consolidation.torchzip import ITEMSIZE

    return ITEMSIZE[ref.dtype]
