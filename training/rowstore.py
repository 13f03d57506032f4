"""The on-disk form of a prepared split, written window by window and read memory-mapped.

Packed (`packing: true`), per split:
    <split>.rows.bin        rows x max_length token ids (uint16 when the vocabulary fits, else uint32), padded
    <split>.pieces.bin      int32 length of every document piece, in row order
    <split>.row_pieces.bin  int64 rows + 1 offsets into the pieces
Not packed: <split>.tokens.bin (all documents back to back) and <split>.docs.bin (int64 documents + 1 offsets).

A row is read as one contiguous slice; position_ids and labels are computed from the piece lengths
(training/packing.py::row_arrays), so the files hold each token once. Readers open the maps lazily, in the
process that reads (DataLoader workers included), so no rank ever copies the corpus into its own memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tune_launch.training.datacache import ChecksumWriter
from tune_launch.training.packing import fill_rows, pack_plan, row_arrays

WINDOW_TOKENS = 1 << 24  # documents packed together: large enough for < 0.1% extra padding, small enough to stay in RAM
FILL_ROWS = 1024  # rows gathered per numpy call when writing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class SplitWriter:
    """Collects tokenized documents and writes them as rows; `close()` returns the files' sizes and checksums."""

    def __init__(self, folder: Path, split: str, max_length: int, packing: bool, pad_id: int, dtype: np.dtype,
                 window_tokens: int = WINDOW_TOKENS) -> None:
        self.split, self.max_length, self.packing, self.pad_id, self.dtype = split, max_length, packing, pad_id, dtype
        self.window_tokens = window_tokens
        names = ("rows", "pieces", "row_pieces") if packing else ("tokens", "docs")
        self.files = {n: ChecksumWriter(folder / f"{split}.{n}.bin") for n in names}
        self._tokens: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._buffered = 0
        self.rows = self.pieces = self.documents = self.tokens = 0  # what has been written
        self.files["row_pieces" if packing else "docs"].write(np.zeros(1, np.int64).tobytes())

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back (`tokens`) with their `lengths`."""
        if not len(lengths):
            return
        self._tokens.append(tokens)
        self._lengths.append(lengths)
        self._buffered += len(tokens)
        self.documents += len(lengths)
        if self._buffered >= self.window_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._lengths:
            return
        tokens = np.concatenate(self._tokens)
        lengths = np.concatenate(self._lengths)
        self._tokens, self._lengths, self._buffered = [], [], 0
        if self.packing:
            self._write_packed(tokens, lengths)
        else:
            self._write_docs(tokens, lengths)

    def _write_packed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        starts = np.cumsum(lengths) - lengths
        plan = pack_plan(lengths, self.max_length)
        _doc, _off, piece, row_offsets = plan
        n_rows = len(row_offsets) - 1
        for first in range(0, n_rows, FILL_ROWS):
            last = min(first + FILL_ROWS, n_rows)
            self.files["rows"].write(fill_rows(tokens, starts, plan, first, last, self.max_length, self.pad_id, self.dtype).tobytes())
        self.files["pieces"].write(piece.astype(np.int32).tobytes())
        self.files["row_pieces"].write((row_offsets[1:] + self.pieces).astype(np.int64).tobytes())
        self.rows += n_rows
        self.pieces += len(piece)
        self.tokens += int(piece.sum())

    def _write_docs(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Un-packed: documents cut into pieces of at most max_length (none dropped), each its own row."""
        from tune_launch.training.packing import split_long

        doc, offset, piece = split_long(lengths, self.max_length)
        starts = (np.cumsum(lengths) - lengths)[doc] + offset
        keep = np.repeat(starts - np.cumsum(piece) + piece, piece) + np.arange(int(piece.sum()))
        self.files["tokens"].write(tokens[keep].astype(self.dtype).tobytes())
        self.files["docs"].write((np.cumsum(piece) + self.tokens).astype(np.int64).tobytes())
        self.rows += len(piece)
        self.tokens += int(piece.sum())

    def close(self) -> dict[str, dict[str, Any]]:
        self.flush()
        return {w.path.name: w.close() for w in self.files.values()}

    def stats(self) -> dict[str, Any]:
        slots = self.rows * self.max_length
        return {"documents": self.documents, "rows": self.rows, "tokens": self.tokens,
                "padding": (1 - self.tokens / slots) if self.packing and slots else 0.0}


class StoredRows:
    """A prepared split as a map-style torch Dataset over memory-mapped files (rows as int64 numpy arrays)."""

    def __init__(self, folder: Path, split: str, packing: bool, max_length: int, dtype: str, rows: int) -> None:
        self.folder, self.split, self.packing, self.max_length = Path(folder), split, packing, max_length
        self.dtype, self.rows = np.dtype(dtype), rows
        self._maps: dict[str, np.ndarray] | None = None

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            def mm(name: str, dtype) -> np.ndarray:
                path = self.folder / f"{self.split}.{name}.bin"
                return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)

            if self.packing:
                self._maps = {"rows": mm("rows", self.dtype).reshape(-1, self.max_length),
                              "pieces": mm("pieces", np.int32), "row_pieces": mm("row_pieces", np.int64)}
            else:
                self._maps = {"tokens": mm("tokens", self.dtype), "docs": mm("docs", np.int64)}
        return self._maps

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        i %= self.rows
        m = self._open()
        if self.packing:
            lo, hi = m["row_pieces"][i], m["row_pieces"][i + 1]
            return row_arrays(np.asarray(m["rows"][i]), m["pieces"][lo:hi])
        lo, hi = m["docs"][i], m["docs"][i + 1]
        return {"input_ids": np.asarray(m["tokens"][lo:hi], dtype=np.int64)}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_maps": None}

    def __repr__(self) -> str:
        return f"StoredRows({self.folder.name}/{self.split}, {self.rows} rows)"
