"""What every checkpoint reader produces: each full tensor as a list of byte ranges in shard files.

A reader only plans (names, shapes, where each piece lives); `assemble` is the one place that reads,
one tensor at a time, so memory stays at one tensor whatever the model size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tune_launch.launch.consolidation.arrays import convert_into, empty, storage_dtype
from tune_launch.launch.consolidation.torchzip import ITEMSIZE, TensorRef
from tune_launch.errors import TuneLaunchError


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
            end = p.ref.data_offset + (p.ref.storage_offset + p.start + p.count) * ITEMSIZE[p.ref.dtype]
            size = sizes.setdefault(p.ref.path, Path(p.ref.path).stat().st_size)
            if end > size:
                raise ConsolidateError(f"truncated shard {p.ref.path}: {t.name} needs {end} bytes, the file has {size}; "
                                       "copy the file again or use an earlier checkpoint")


def pread_exact(fd: int, buf: np.ndarray, offset: int) -> bool:
    """Fill contiguous `buf` with the bytes at `offset` of `fd` (positioned reads, retried when short);
    False when the file ends first."""
    view, done = memoryview(buf.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True


BLOCK_BYTES = 64 << 20  # pieces that need converting are read and converted this many source bytes at a time


class FileCache:
    """Shard files opened once each for the whole run; pieces are read with positioned reads (preadv).

    Measured on this project's CPU box (bench/consolidate.py, 946 MB of ZeRO-3 partitions, warm cache):
    copying out of an mmap costs 1.0-1.8 s in page faults, preadv straight into a reused buffer 0.24 s.
    Reads land directly in the output buffer, so nothing but the pooled buffers is ever resident.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._staging: np.ndarray | None = None

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_into(self, path: str, offset: int, buf: np.ndarray) -> None:
        """Fill `buf` (a contiguous array) with the bytes at `offset`; a short file is a truncated shard."""
        if not pread_exact(self.fd(path), buf, offset):
            raise ConsolidateError(f"truncated shard {path}: ends before byte {offset + buf.nbytes}; "
                                   "copy the file again or use an earlier checkpoint")

    def staging(self, dtype: str, numel: int) -> np.ndarray:
        """A reusable buffer for pieces that need converting (grown to the largest block once)."""
        nbytes = numel * ITEMSIZE[dtype]
        if self._staging is None or self._staging.size < nbytes:
            self._staging = np.empty(nbytes, dtype=np.uint8)
        return self._staging[:nbytes].view(storage_dtype(dtype))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._staging = None


def assemble(t: SourceTensor, files: FileCache, dtype: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The full tensor in `dtype` (numpy storage dtype; bf16 as uint16 bits), read piece by piece into `out`
    (a flat array of t.numel) or a new one. Pieces that need converting go through a bounded staging block."""
    out_dtype = dtype or t.dtype
    flat = out if out is not None else empty(t.numel, out_dtype)
    for p in t.pieces:
        item = ITEMSIZE[p.ref.dtype]
        if not p.ref.is_contiguous:
            storage = np.empty(p.ref.storage_nbytes // item, dtype=storage_dtype(p.ref.dtype))
            files.read_into(p.ref.path, p.ref.data_offset, storage)
            src = np.lib.stride_tricks.as_strided(
                storage[p.ref.storage_offset:], p.ref.shape, tuple(s * item for s in p.ref.stride))
            _place(flat, t.shape, p, 0, src.reshape(-1)[p.start:p.start + p.count], out_dtype, p.ref.dtype)
            continue
        offset = p.ref.data_offset + (p.ref.storage_offset + p.start) * item
        if p.region is None and p.ref.dtype == out_dtype:
            files.read_into(p.ref.path, offset, flat[p.dest:p.dest + p.count])  # straight into the output
            continue
        # Blocks of whole rows of the piece (a region is copied row by row of its first dimension).
        row = math.prod(s for _, s in p.region[1:]) if p.region else 1
        step = max(row, (BLOCK_BYTES // item) // row * row)
        for lo in range(0, p.count, step):
            n = min(step, p.count - lo)
            src = files.staging(p.ref.dtype, n)
            files.read_into(p.ref.path, offset + lo * item, src)
            _place(flat, t.shape, p, lo, src, out_dtype, p.ref.dtype)
    return flat.reshape(t.shape)


def _place(flat: np.ndarray, shape: tuple[int, ...], p: Piece, lo: int, src: np.ndarray, out_dtype: str,
           src_dtype: str) -> None:
    """Elements [lo, lo+len(src)) of piece p, converted, into their place in the flat output."""
    if p.region is None:
        convert_into(flat[p.dest + lo:p.dest + lo + src.size], out_dtype, src, src_dtype)
        return
    sizes = tuple(s for _, s in p.region)
    row = math.prod(sizes[1:])
    first = p.region[0][0] + lo // row
    box = flat.reshape(shape)[(slice(first, first + src.size // row),) + tuple(slice(o, o + s) for o, s in p.region[1:])]
    convert_into(box, out_dtype, src.reshape((src.size // row,) + sizes[1:]), src_dtype)
