"""Tensor bytes as numpy arrays, and the dtype conversions consolidation needs, without importing torch.

Importing torch costs ~1.5 s on a CPU box, longer than streaming a 1 GB checkpoint, so the streaming
path works on numpy arrays. bfloat16 has no numpy dtype: it is carried as its raw uint16 bits and
converted the way torch does (round to nearest even; a NaN becomes the quiet NaN 0x7FC0).
"""

from __future__ import annotations

import numpy as np

_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64,
            "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
            "bool": np.bool_}


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds a torch dtype's bytes (bfloat16 -> uint16)."""
    try:
        return np.dtype(_STORAGE[dtype])
    except KeyError:
        from tune_launch.launch.consolidation.source import ConsolidateError

        raise ConsolidateError(f"tensors of dtype {dtype} are not supported; expected one of {sorted(_STORAGE)}") from None


def empty(numel: int, dtype: str) -> np.ndarray:
    return np.empty(numel, dtype=storage_dtype(dtype))


def as_bytes(arr: np.ndarray) -> np.ndarray:
    """A contiguous array's bytes, flat, without a copy."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def to_float32(src: np.ndarray, src_dtype: str) -> np.ndarray:
    if src_dtype == "bfloat16":
        return (src.astype(np.uint32) << 16).view(np.float32)
    return src.astype(np.float32, copy=False)


def float32_to_bfloat16(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """torch's rounding: add 0x7FFF plus the lowest kept bit, keep the top 16 bits; NaN -> 0x7FC0.
    In-place ufuncs on one uint32 temporary (of src's size: callers pass bounded blocks)."""
    bits = np.ascontiguousarray(src).view(np.uint32)
    tmp = np.right_shift(bits, 16)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    if out is None:
        out = np.empty(src.shape, dtype=np.uint16)
    np.copyto(out, tmp.reshape(out.shape), casting="unsafe")
    nan = np.isnan(src)
    if nan.any():
        out[nan.reshape(out.shape)] = 0x7FC0
    return out


def convert_into(out: np.ndarray, out_dtype: str, src: np.ndarray, src_dtype: str) -> None:
    """out[...] = src converted from src_dtype to out_dtype (shapes equal; both in their storage dtypes).
    Values beyond the target's range become inf, as torch's .to() makes them."""
    with np.errstate(over="ignore", invalid="ignore"):
        _convert_into(out, out_dtype, src, src_dtype)


def _convert_into(out: np.ndarray, out_dtype: str, src: np.ndarray, src_dtype: str) -> None:
    if src_dtype == out_dtype:
        out[...] = src
    elif out_dtype == "bfloat16":
        float32_to_bfloat16(src if src_dtype == "float32" else to_float32(src, src_dtype), out)
    elif src_dtype == "bfloat16":
        out[...] = to_float32(src, src_dtype).astype(storage_dtype(out_dtype), copy=False)
    else:
        out[...] = src.astype(storage_dtype(out_dtype), copy=False)


def convert(src: np.ndarray, src_dtype: str, out_dtype: str) -> np.ndarray:
    out = np.empty(src.shape, dtype=storage_dtype(out_dtype))
    convert_into(out, out_dtype, src, src_dtype)
    return out
