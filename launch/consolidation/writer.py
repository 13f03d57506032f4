"""Safetensors files written by streaming: header first (known from the plan), then each tensor's bytes.

A background thread writes and hashes tensor N while the caller assembles tensor N+1 into the other of
two pooled buffers (sized to the largest tensor), so memory stays near two tensors whatever the model
size, and no page is faulted in twice.
Every file is fsynced; the SHA-256 of each file is computed from the bytes as they are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from launch.consolidation.plan import SAFETENSORS_DTYPES, OutputTensor, Shard
from launch.consolidation.source import ConsolidateError


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


def tensor_bytes(t):
    """A contiguous CPU tensor's bytes as a buffer (bf16 has no numpy dtype, so view it as bytes)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class _FileSink:
    """Writes a buffer to the file while a second thread hashes the same buffer (both release the GIL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.written = 0

    def write(self, buf) -> None:
        view = memoryview(buf).cast("B")
        if len(view) < (8 << 20):
            self.fh.write(view)
            self.sha.update(view)
        else:
            hasher = threading.Thread(target=self.sha.update, args=(view,))
            hasher.start()
            self.fh.write(view)
            hasher.join()
        self.written += len(view)

    def finish(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return self.sha.hexdigest()


def write_shards(shards: list[Shard], folder: Path, produce: Callable[..., object],
                 on_tensor: Callable[[OutputTensor], None] | None = None) -> dict[str, str]:
    """Write every shard into `folder`; `produce(t, out)` fills flat buffer `out` with tensor t. -> {file: sha256}."""
    import torch

    work: queue.Queue = queue.Queue()
    largest = max((t.nbytes for s in shards for t in s.tensors), default=0)
    pool: queue.Queue = queue.Queue()
    for _ in range(2):
        pool.put(torch.empty(max(largest, 8), dtype=torch.uint8))
    hashes: dict[str, str] = {}
    failure: list[BaseException] = []

    def writer() -> None:
        sink: _FileSink | None = None
        while True:
            item = work.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if failure:
                    continue
                if kind == "open":
                    sink = _FileSink(folder / payload[0])
                    sink.write(payload[1])
                elif kind == "tensor":
                    spec, tensor, _buf = payload
                    buf = tensor_bytes(tensor)
                    if len(buf) != spec.nbytes:
                        raise ConsolidateError(f"{spec.name}: produced {len(buf)} bytes, planned {spec.nbytes}")
                    sink.write(buf)
                    del buf, tensor
                    if on_tensor is not None:
                        on_tensor(spec)
                elif kind == "close":
                    hashes[sink.path.name] = sink.finish()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failure.append(e)
            finally:
                if item is not None and item[0] == "tensor":
                    pool.put(item[1][2])

    thread = threading.Thread(target=writer, name="safetensors-writer", daemon=True)
    thread.start()
    try:
        for shard in shards:
            work.put(("open", (shard.file, header_bytes(shard.tensors))))
            for spec in shard.tensors:
                buf = pool.get()
                if failure:
                    pool.put(buf)
                    break
                try:
                    tensor = produce(spec, buf[:spec.nbytes].view(getattr(torch, spec.dtype)))
                except BaseException:
                    pool.put(buf)
                    raise
                work.put(("tensor", (spec, tensor, buf)))
                del tensor, buf
            work.put(("close", None))
            if failure:
                break
    finally:
        work.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return hashes


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
