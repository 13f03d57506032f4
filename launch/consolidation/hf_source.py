"""A Hugging Face safetensors folder as a Source: the base weights a LoRA checkpoint was trained on.

LoRA checkpoints (Trainer under FSDP or ZeRO) hold only the adapters; --merge-lora reads the base
weights from the folder named by adapter_config.json's base_model_name_or_path, the same way: headers
first, bytes one tensor at a time through the mapping.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tune_launch.launch.consolidation.source import ConsolidateError, Piece, Source, SourceTensor
from tune_launch.launch.consolidation.torchzip import TensorRef, contiguous_strides

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors_file(path: Path) -> list[SourceTensor]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConsolidateError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ConsolidateError(f"{path}: damaged safetensors header") from None
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConsolidateError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape = tuple(int(s) for s in info["shape"])
        lo, hi = info["data_offsets"]
        ref = TensorRef(str(path), 8 + n + lo, hi - lo, dtype, shape, contiguous_strides(shape), 0)
        out.append(SourceTensor(name, shape, dtype, (Piece(ref, 0, ref.numel),)))
    return out


def read_hf_folder(folder: Path) -> Source:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConsolidateError(f"{folder}: no model.safetensors(.index.json); --merge-lora needs the base model's "
                               "safetensors weights (pass --config DIR pointing at the base model folder)")
    tensors = [t for f in files for t in read_safetensors_file(folder / f)]
    return Source("hf-safetensors", folder, tensors, files=[folder / f for f in files])
