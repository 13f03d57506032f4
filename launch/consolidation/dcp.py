"""FSDP sharded checkpoints (torch.distributed.checkpoint): plan each tensor from `.metadata` alone.

`.metadata` lists, per tensor, its chunks (offsets, sizes) and, per chunk, the file and byte range
where torch.save wrote it (or raw bytes, in newer torch's raw format). Accelerate saves the model as
{"model": state_dict}, so the names lose that first component.
"""

from __future__ import annotations

import math
from pathlib import Path

from tune_launch.launch.consolidation.source import ConsolidateError, Piece, Source, SourceTensor, check_coverage
from tune_launch.launch.consolidation.torchzip import (ITEMSIZE, TensorRef, TorchZipError, contiguous_strides, index_slice,
                                                    load_pickle)

ZIP_MAGIC = b"PK\x03\x04"


def find_dcp_dir(path: Path) -> Path | None:
    """The DCP folder of a checkpoint: the folder itself, or its pytorch_model_fsdp_0 (accelerate's name)."""
    if (path / ".metadata").is_file():
        return path
    for name in ("pytorch_model_fsdp_0", "pytorch_model_fsdp"):
        if (path / name / ".metadata").is_file():
            return path / name
    return None


def _read_metadata(dcp_dir: Path):
    """`.metadata` through the restricted unpickler: torch's own reader would cost a torch import (~1.5 s)
    and run the pickle. Its dataclasses come back as records with the same attribute names."""
    try:
        md = load_pickle(dcp_dir / ".metadata")
    except (TorchZipError, OSError) as e:
        raise ConsolidateError(f"unreadable {dcp_dir / '.metadata'} ({e}); "
                               "the save did not finish or the file is damaged") from None
    if not isinstance(getattr(md, "state_dict_metadata", None), dict) or not isinstance(getattr(md, "storage_data", None), dict):
        raise ConsolidateError(f"{dcp_dir / '.metadata'} is not torch.distributed.checkpoint metadata "
                               "(no state_dict_metadata/storage_data); the file is damaged or of another format")
    return md


def _is_tensor_meta(meta) -> bool:
    return type(meta).__name__ == "TensorStorageMetadata"


def _dtype(meta) -> str:
    """TensorProperties pickles its fields as a tuple (dtype first) in torch 2.x, as a dict in others."""
    props = meta.properties
    dtype = getattr(props, "dtype", None)
    if dtype is None and isinstance(getattr(props, "state", None), tuple) and props.state:
        dtype = props.state[0]
    return str(dtype).replace("torch.", "")


def _output_names(md) -> dict[str, str]:
    """fqn -> state-dict key: drop the single top-level key accelerate wraps the model in."""
    planner = md.planner_data if isinstance(getattr(md, "planner_data", None), dict) else {}
    paths = {fqn: planner.get(fqn) for fqn in md.state_dict_metadata}
    tops = {p[0] for p in paths.values() if isinstance(p, (tuple, list)) and len(p) > 1}
    if len(tops) == 1 and all(isinstance(p, (tuple, list)) and len(p) > 1 for p in paths.values()):
        return {fqn: ".".join(str(x) for x in p[1:]) for fqn, p in paths.items()}
    return {fqn: fqn for fqn in paths}


def read_dcp(dcp_dir: Path) -> Source:
    md = _read_metadata(dcp_dir)
    try:
        return _plan(dcp_dir, md)
    except (AttributeError, TypeError, ValueError) as e:  # a record lacking a field torch writes
        raise ConsolidateError(f"{dcp_dir / '.metadata'} is not metadata this version understands ({type(e).__name__}: "
                               f"{e}); the file is damaged, or written by a torch.distributed.checkpoint this tool does not know") from None


def _plan(dcp_dir: Path, md) -> Source:
    names = _output_names(md)
    storage = {(idx.fqn, tuple(getattr(idx, "offset", None) or ())): info for idx, info in md.storage_data.items()}
    files = sorted({info.relative_path for info in storage.values()})
    for rel in files:
        if not (dcp_dir / rel).is_file():
            raise ConsolidateError(f"missing rank file {dcp_dir / rel} (listed in {dcp_dir / '.metadata'}); "
                                   "copy every __<rank>_0.distcp of this save into the folder")
    tensors: list[SourceTensor] = []
    for fqn, meta in md.state_dict_metadata.items():
        if not _is_tensor_meta(meta):
            continue  # bytes entries (extra state) are not weights
        dtype = _dtype(meta)
        if dtype not in ITEMSIZE:
            raise ConsolidateError(f"{dcp_dir / '.metadata'}: {fqn} has dtype {dtype!r}, which consolidation does not support")
        shape = tuple(int(s) for s in meta.size)
        pieces = []
        for chunk in meta.chunks:
            offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
            info = storage.get((fqn, offsets))
            if info is None:
                raise ConsolidateError(f"{dcp_dir / '.metadata'} lists chunk {offsets} of {fqn} without a file")
            ref = _chunk_ref(dcp_dir, info, dtype, sizes, fqn)
            pieces.append(_piece(ref, shape, offsets, sizes))
        t = SourceTensor(names[fqn], shape, dtype, tuple(pieces))
        check_coverage(t)
        tensors.append(t)
    save_id = getattr(getattr(md, "storage_meta", None), "save_id", None)
    return Source("fsdp-dcp", dcp_dir, tensors, files=[dcp_dir / f for f in files],
                  details={"ranks": len(files), "save_id": save_id})


def _chunk_ref(dcp_dir: Path, info, dtype: str, sizes: tuple[int, ...], fqn: str) -> TensorRef:
    path = dcp_dir / info.relative_path
    if getattr(info, "transform_descriptors", None):
        raise ConsolidateError(f"{path}: chunks stored with transforms {list(info.transform_descriptors)} "
                               "(e.g. compression) are not supported; save without storage extensions")
    size = path.stat().st_size
    if info.offset + info.length > size:
        raise ConsolidateError(f"truncated shard {path}: {fqn} needs bytes up to {info.offset + info.length}, "
                               f"the file has {size} (truncated, or written by a different save); copy this save's file again")
    with open(path, "rb") as fh:
        fh.seek(info.offset)
        magic = fh.read(4)
    if magic != ZIP_MAGIC:  # raw tensor bytes
        nbytes = math.prod(sizes) * ITEMSIZE.get(dtype, 0)
        if nbytes != info.length:
            raise ConsolidateError(f"{path}: chunk of {fqn} at byte {info.offset} is neither a torch.save blob nor "
                                   f"{nbytes} raw bytes; this file does not belong to this .metadata")
        return TensorRef(str(path), info.offset, nbytes, dtype, sizes, contiguous_strides(sizes), 0)
    try:
        ref = index_slice(path, info.offset, info.length)
    except TorchZipError as e:
        raise ConsolidateError(f"{path}: chunk of {fqn} at byte {info.offset} is damaged ({e}); this file does not "
                               "belong to this .metadata (a different save?) or is corrupt") from None
    if not isinstance(ref, TensorRef) or ref.shape != sizes or ref.dtype != dtype:
        got = (ref.shape, ref.dtype) if isinstance(ref, TensorRef) else type(ref).__name__
        raise ConsolidateError(f"{path}: chunk of {fqn} holds {got}, .metadata expects {(sizes, dtype)}; "
                               "the rank files come from different saves")
    return ref


def _piece(ref: TensorRef, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Piece:
    n = math.prod(sizes)
    if not shape or all(o == 0 and s == full for o, s, full in zip(offsets[1:], sizes[1:], shape[1:])):
        row = math.prod(shape[1:]) if shape else 1
        return Piece(ref, 0, n, dest=(offsets[0] * row) if shape else 0)
    return Piece(ref, 0, n, region=tuple(zip(offsets, sizes)))
