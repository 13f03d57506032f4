"""Safetensors files written by streaming: header first (known from the plan), then each tensor's bytes.

A background thread writes and hashes tensor N while the caller assembles tensor N+1 into the other of
two pooled buffers (sized to the largest tensor), so memory stays near two tensors whatever the model
size. Files are written with O_DIRECT where the filesystem allows it: the bytes go from those two
buffers to the disk without passing through the page cache, so a 100 GB model does not evict
everything else from RAM, and no fresh page-cache memory has to be faulted in for every byte written
(measured on this project's CPU VM: 1.2 GB buffered writes took 0.3-3.2 s plus a 0.4 s fsync, O_DIRECT
0.3-0.6 s in all). O_DIRECT needs page-aligned memory, offsets and lengths: each tensor is assembled at
the offset within its buffer that matches its file offset modulo the page size, the unaligned tail of
the previous tensor (under one page) is copied in front of it, and the last page of a file is padded
and then truncated. Filesystems that refuse O_DIRECT (tmpfs, some network mounts) get plain writes.
Every file is fsynced; the SHA-256 of each file is computed from the bytes as they are written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tune_launch.launch.consolidation.arrays import as_bytes, storage_dtype
from tune_launch.launch.consolidation.plan import SAFETENSORS_DTYPES, OutputTensor, Shard
from tune_launch.launch.consolidation.source import ConsolidateError

PAGE = 4096
_HASH_IN_THREAD = 8 << 20  # hash larger buffers in a second thread while the write runs


def header_bytes(tensors: tuple[OutputTensor, ...], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte little-endian length + JSON (padded with spaces to a multiple of 8), offsets in plan order."""
    head: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        head[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def aligned_buffer(nbytes: int) -> np.ndarray:
    """Page-aligned anonymous memory (what O_DIRECT needs), as a uint8 array."""
    return np.frombuffer(mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE)), dtype=np.uint8)


def _write_all(fd: int, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:])
        if n <= 0:
            raise ConsolidateError(f"{path}: the disk accepted no more bytes (full?); free space and run again")
        done += n


class _FileSink:
    """One output file: bytes arrive in order; written with O_DIRECT (see the module docstring) or plainly.

    `align` is 1 for plain writes, PAGE for O_DIRECT: a caller places the bytes that start at file offset P at
    `P % align` within a page-aligned buffer, leaving the space in front of them for the carried tail.
    """

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.path = path
        self.sha = hashlib.sha256()
        self.written = 0  # bytes of the file handed to the sink
        self._carry = b""  # under one page, not yet on disk (O_DIRECT only)
        self.fd, self.align = self._open(path, direct)

    @staticmethod
    def _open(path: Path, direct: bool) -> tuple[int, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            else:
                probe = aligned_buffer(PAGE)
                try:
                    os.write(fd, memoryview(probe))  # some filesystems accept the flag but refuse the write
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    return fd, PAGE
                except OSError as e:
                    os.close(fd)
                    if e.errno != errno.EINVAL:
                        raise
        return os.open(path, flags, 0o644), 1

    def _hashed_write(self, page_view: memoryview, data: memoryview) -> None:
        """Write `page_view` (page-aligned when direct) while `data` (the new bytes in it) is hashed."""
        if len(data) < _HASH_IN_THREAD:
            self.sha.update(data)
            _write_all(self.fd, page_view, self.path)
            return
        hasher = threading.Thread(target=self.sha.update, args=(data,))
        hasher.start()
        try:
            _write_all(self.fd, page_view, self.path)
        finally:
            hasher.join()

    def write_at(self, buf: np.ndarray, lead: int, nbytes: int) -> None:
        """Write buf[lead:lead+nbytes], the next bytes of the file; buf is page-aligned and buf[:lead] is free."""
        if lead != self.written % self.align:
            raise ConsolidateError(f"internal: {self.path} bytes placed at {lead}, expected {self.written % self.align}")
        if self.align == 1:
            view = memoryview(buf[lead:lead + nbytes])
            self._hashed_write(view, view)
        else:
            buf[:lead] = np.frombuffer(self._carry, dtype=np.uint8)
            total = lead + nbytes
            full = total - total % PAGE
            self._hashed_write(memoryview(buf[:full]), memoryview(buf[lead:lead + nbytes]))
            self._carry = bytes(buf[full:total])
        self.written += nbytes

    def write_bytes(self, data: bytes) -> None:
        """Small writes (the header): through a scratch aligned buffer."""
        buf = aligned_buffer(len(data) + PAGE)
        lead = self.written % self.align
        buf[lead:lead + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.write_at(buf, lead, len(data))

    def finish(self) -> str:
        if self._carry:  # the last partial page: write it padded, then cut the file to its length
            buf = aligned_buffer(PAGE)
            buf[:len(self._carry)] = np.frombuffer(self._carry, dtype=np.uint8)
            _write_all(self.fd, memoryview(buf), self.path)
            os.ftruncate(self.fd, self.written)
            self._carry = b""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return self.sha.hexdigest()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_shards(shards: list[Shard], folder: Path, produce: Callable[..., object],
                 on_tensor: Callable[[OutputTensor], None] | None = None, direct: bool = True) -> dict[str, str]:
    """Write every shard into `folder`; `produce(t, out)` fills flat array `out` with tensor t. -> {file: sha256}."""
    work: queue.Queue = queue.Queue(maxsize=2)
    largest = max((t.nbytes for s in shards for t in s.tensors), default=0)
    pool: queue.Queue = queue.Queue()
    for _ in range(2):
        pool.put(aligned_buffer(largest + 2 * PAGE))
    hashes: dict[str, str] = {}
    failure: list[BaseException] = []
    sinks: list[_FileSink] = []

    def writer() -> None:
        while True:
            item = work.get()
            if item is None:
                return
            kind, payload = item
            try:
                if failure:
                    continue
                if kind == "tensor":
                    sink, spec, tensor, buf, lead = payload
                    data = as_bytes(tensor)
                    if len(data) != spec.nbytes:
                        raise ConsolidateError(f"{spec.name}: produced {len(data)} bytes, planned {spec.nbytes}")
                    if data.ctypes.data != buf.ctypes.data + lead:  # produce returned new memory: move it in place
                        buf[lead:lead + spec.nbytes] = data
                    del data, tensor
                    sink.write_at(buf, lead, spec.nbytes)
                    if on_tensor is not None:
                        on_tensor(spec)
                elif kind == "close":
                    hashes[payload.path.name] = payload.finish()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failure.append(e)
            finally:
                if kind == "tensor":
                    pool.put(payload[3])

    thread = threading.Thread(target=writer, name="safetensors-writer", daemon=True)
    thread.start()
    try:
        for shard in shards:
            sink = _FileSink(folder / shard.file, direct)
            sinks.append(sink)
            sink.write_bytes(header_bytes(shard.tensors))
            position = sink.written
            for spec in shard.tensors:
                buf = pool.get()
                if failure:
                    pool.put(buf)
                    break
                lead = position % sink.align
                try:
                    tensor = produce(spec, buf[lead:lead + spec.nbytes].view(storage_dtype(spec.dtype)))
                except BaseException:
                    pool.put(buf)
                    raise
                work.put(("tensor", (sink, spec, tensor, buf, lead)))
                position += spec.nbytes
                del tensor, buf
            work.put(("close", sink))
            if failure:
                break
    finally:
        work.put(None)
        thread.join()
        for sink in sinks:
            sink.abort()
    if failure:
        raise failure[0]
    return hashes

