"""Index the tensors of a torch.save file without running its pickle or reading its data.

DCP chunks and DeepSpeed's *_states.pt files are torch.save zip archives. `torch.load` would execute
their pickles (DeepSpeed's need `weights_only=False`) and read every storage. Here a restricted
unpickler turns each tensor into a `TensorRef` (absolute byte offset in the file, dtype, shape,
stride) and every other class into an inert stub, so nothing from the file runs and no tensor data
is read until a reader asks for exactly those bytes (positioned reads, see source.FileCache).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8",
}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) of a dense tensor of `shape`."""
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


class TorchZipError(ValueError):
    """The bytes are not a readable torch.save archive (truncated, overwritten, or another format)."""


@dataclass(frozen=True)
class TensorRef:
    """Where a saved tensor's elements live: `data_offset` is the absolute file offset of its storage."""

    path: str
    data_offset: int
    storage_nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


class _Stub:
    """Stands in for any class the archive names: accepts any construction and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        """Dataclass-like state becomes attributes (DCP's Metadata, chunks...); anything else stays in `state`."""
        self.state = state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
                and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (__dict__, __slots__ values)
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str) and k not in ("state", "args"):
                    self.__dict__[k] = v

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(*args)


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"__module__": f"stub.{module}"})


class _Window(io.RawIOBase):
    """A read-only, seekable view of `length` bytes of `fh` starting at `base` (a DCP chunk)."""

    def __init__(self, fh: Any, base: int, length: int) -> None:
        self._fh, self._base, self._len, self._pos = fh, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fh.fileno(), n, self._base + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: Any, storages: dict[str, int], path: str) -> None:
        super().__init__(fh)
        self._offsets, self._path = storages, path

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise TorchZipError(f"unexpected persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type if isinstance(storage_type, str) else "uint8"
        return _Storage(str(key), dtype, int(numel))

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *a: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, _new_type, args, _state: func(*args)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in ITEMSIZE:
            return name  # a dtype object
        if module == "torch" and name == "Size":
            return tuple
        if (module, name) == ("copyreg", "_reconstructor"):
            return lambda cls, _base, _state: cls() if isinstance(cls, type) and issubclass(cls, _Stub) else _Stub()
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("builtins", "slice"), ("builtins", "complex")):
            return super().find_class(module, name)
        return _stub_class(module, name)

    def _rebuild_tensor(self, storage: _Storage, storage_offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
        if storage.key not in self._offsets:
            raise TorchZipError(f"storage {storage.key} listed in the pickle has no data record")
        return TensorRef(self._path, self._offsets[storage.key], storage.numel * ITEMSIZE.get(storage.dtype, 1),
                         storage.dtype, tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset))


def _index(fh: Any, base: int, path: str) -> Any:
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise TorchZipError(f"not a torch.save archive ({e})") from None
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise TorchZipError("archive has no data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    offsets: dict[str, int] = {}
    for info in zf.infolist():
        if not info.filename.startswith(prefix + "data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise TorchZipError(f"record {info.filename} is compressed")
        fh.seek(info.header_offset)
        header = fh.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise TorchZipError(f"record {info.filename} has a damaged header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        offsets[info.filename[len(prefix) + 5:]] = base + info.header_offset + 30 + name_len + extra_len
    try:
        with zf.open(pkl[0]) as pf:
            return _Unpickler(io.BytesIO(pf.read()), offsets, path).load()
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise TorchZipError(f"unreadable pickle ({e})") from None


def index_file(path: str | os.PathLike) -> Any:
    """The object a torch.save file holds, with TensorRef for every tensor."""
    with open(path, "rb") as fh:
        return _index(fh, 0, str(path))


def index_slice(path: str | os.PathLike, offset: int, length: int) -> Any:
    """Same for a torch.save blob stored at [offset, offset+length) inside a larger file (a DCP chunk)."""
    with open(path, "rb") as fh:
        return _index(_Window(fh, offset, length), offset, str(path))


def load_pickle(path: str | os.PathLike) -> Any:
    """A plain pickle file (DCP's .metadata) read with the same rules: classes become inert records whose
    saved fields are attributes, torch dtypes become their names, and no code from the file runs."""
    with open(path, "rb") as fh:
        try:
            return _Unpickler(fh, {}, str(path)).load()
        except (pickle.UnpicklingError, EOFError, TorchZipError, ValueError, TypeError, IndexError, KeyError) as e:
            raise TorchZipError(f"unreadable pickle ({type(e).__name__}: {e})") from None


def read_small(ref: TensorRef):
    """A small contiguous tensor (a step counter) as a flat numpy array in its storage dtype."""
    import numpy as np

    from tune_launch.launch.consolidation.arrays import storage_dtype

    item = ITEMSIZE[ref.dtype]
    with open(ref.path, "rb") as fh:
        raw = os.pread(fh.fileno(), ref.numel * item, ref.data_offset + ref.storage_offset * item)
    if len(raw) != ref.numel * item:
        raise TorchZipError(f"{ref.path} is truncated: a {ref.numel}-element tensor at byte {ref.data_offset} is cut short")
    return np.frombuffer(raw, dtype=storage_dtype(ref.dtype))
