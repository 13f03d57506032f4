"""Reading the YAML's data sources as batches of text, in bounded memory, with the row of every document known.

Local files are read by hand rather than through `datasets.load_dataset`, for two reasons: nothing is converted
or copied before tokenization starts, and a bad row is reported as one line naming the file and the line
(`corpus.jsonl: line 18: no field 'text' (fields: body, id); ...`). Supported: .jsonl/.json (JSON lines or one
JSON array), .txt (one document per line), .parquet, .csv, each optionally .gz, or a folder of such files. Hub
datasets go through `datasets` (downloaded once into its Arrow cache, read memory-mapped).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_launch.errors import TuneLaunchError
from tune_launch.training.schema import DataSource

KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".text": "txt", ".parquet": "parquet", ".csv": "csv"}
BATCH_ROWS = 1000


class DataError(TuneLaunchError):
    """A data file or row that cannot be used: names the file, the row and what to do."""


@dataclass(frozen=True)
class TextBatch:
    texts: list[str]
    rows: list[int]  # the row of each text in its file (1-based line for line formats, 0-based index otherwise)
    file: str
    nbytes: int  # bytes of the file consumed so far (progress)


def kind_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return KINDS.get(suffixes[-1] if suffixes else "", "jsonl")


def local_files(src: DataSource) -> list[Path]:
    """The file, or the data files of a folder (sorted, so the order is the same on every machine)."""
    p = Path(str(src.path))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and any(s.lower() in KINDS for s in f.suffixes))
        if not files:
            raise DataError(f"{p}: folder holds no data files ({', '.join(sorted(KINDS))}, optionally .gz)")
        return files
    if not p.exists():
        raise DataError(f"{p}: no such file; fix data.train/eval path")
    return [p]


def _open(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e}); check the path and its permissions") from None


def text_of(value: Any, field: str, where: str, row: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None and isinstance(row, dict) and field not in row:
        fields = ", ".join(sorted(map(str, row))[:8]) or "none"
        raise DataError(f"{where}: no field '{field}' (fields: {fields}); set text_field for this source to the one "
                        "holding the text, or fix the row")
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field '{field}' is {kind}, expected a string; fix or remove the row")


# --------------------------------------------------------------------------- line formats (jsonl, txt)

def line_rows(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset after the line, line) for the lines that start in [start, end). A line that began before
    `start` belongs to the previous range."""
    with _open(path) as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the rest of a line owned by the previous range
        pos = f.tell()
        while end is None or pos < end:
            try:
                line = f.readline()
            except (OSError, EOFError) as e:  # truncated gzip and the like
                raise DataError(f"{path}: cannot be read past byte {pos} ({type(e).__name__}: {e})") from None
            if not line:
                return
            pos += len(line)
            yield pos, line


def line_number(path: Path, offset: int) -> int:
    """1-based line of the line that ends at `offset` (counted only when an error needs it)."""
    count = 0
    with _open(path) as f:
        left = offset
        while left > 0 and (chunk := f.read(min(left, 1 << 24))):
            count += chunk.count(b"\n")
            left -= len(chunk)
    return max(count, 1)


def parse_line(line: bytes, kind: str, field: str, where: str) -> str | None:
    """The text of one jsonl/txt line; None for a blank line."""
    if kind == "txt":
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
        return text if text.strip() else None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError as e:
        msg = (getattr(e, "msg", None) or str(e)).removesuffix(" at")
        col = f" at column {e.colno}" if hasattr(e, "colno") else ""
        raise DataError(f"{where}: not valid JSON ({msg}{col}); fix or remove that line") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a JSON {type(row).__name__}, expected an object with a '{field}' field")
    return text_of(row.get(field), field, where, row)


def parse_at(path: Path, end: int, line: bytes, kind: str, field: str) -> str | None:
    """parse_line for a line read from the middle of a file: its line number is counted only for an error."""
    try:
        return parse_line(line, kind, field, "")
    except DataError as e:
        raise DataError(f"{path}: line {line_number(path, end)}{e}") from None


def _line_batches(path: Path, kind: str, field: str) -> Iterator[TextBatch]:
    texts: list[str] = []
    rows: list[int] = []
    pos = 0
    for lineno, (pos, line) in enumerate(line_rows(path), 1):
        text = parse_line(line, kind, field, f"{path}: line {lineno}")
        if text is not None:
            texts.append(text)
            rows.append(lineno)
            if len(texts) == BATCH_ROWS:
                yield TextBatch(texts, rows, str(path), pos)
                texts, rows = [], []
    if texts:
        yield TextBatch(texts, rows, str(path), pos)


# --------------------------------------------------------------------------- whole-record formats

def _json_array_batches(path: Path, field: str) -> Iterator[TextBatch]:
    with _open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e}); use JSON lines (.jsonl) for large corpora") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected JSON lines or a JSON array of objects, got a JSON {type(data).__name__}")
    size = path.stat().st_size
    for i in range(0, len(data), BATCH_ROWS):
        chunk = data[i:i + BATCH_ROWS]
        texts = []
        for j, row in enumerate(chunk, i):
            where = f"{path}: row {j}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON {type(row).__name__}, expected an object with a '{field}' field")
            texts.append(text_of(row.get(field), field, where, row))
        yield TextBatch(texts, list(range(i, i + len(chunk))), str(path), size * (i + len(chunk)) // max(len(data), 1))


def _parquet_batches(path: Path, field: str) -> Iterator[TextBatch]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(names[:8])}); set text_field for this source")
    size, total, done = path.stat().st_size, max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        values = batch.column(0).to_pylist()
        texts = [text_of(v, field, f"{path}: row {done + j}", {field: v}) for j, v in enumerate(values)]
        yield TextBatch(texts, list(range(done, done + len(values))), str(path), size * (done + len(values)) // total)
        done += len(values)


def _csv_batches(path: Path, field: str) -> Iterator[TextBatch]:
    with _open(path) as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        try:
            header = reader.fieldnames or []
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None
        if field not in header:
            raise DataError(f"{path}: no column '{field}' (columns: {', '.join(header[:8])}); set text_field for this source")
        texts: list[str] = []
        rows: list[int] = []
        try:
            for row in reader:
                texts.append(text_of(row.get(field), field, f"{path}: line {reader.line_num}", row))
                rows.append(reader.line_num)
                if len(texts) == BATCH_ROWS:
                    yield TextBatch(texts, rows, str(path), raw.tell())
                    texts, rows = [], []
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: line {reader.line_num}: unreadable CSV ({e})") from None
        if texts:
            yield TextBatch(texts, rows, str(path), raw.tell())


def file_batches(path: Path, field: str) -> Iterator[TextBatch]:
    """Text batches of one local file; an empty file is an error (it is almost always a mistake)."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file, no documents; fix the path or remove the source")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    kind = kind_of(path)
    if kind == "json":
        with _open(path) as f:
            head = f.read(4096).lstrip()
        kind = "json-array" if head.startswith(b"[") else "jsonl"
    readers = {"jsonl": lambda: _line_batches(path, "jsonl", field), "txt": lambda: _line_batches(path, "txt", field),
               "json-array": lambda: _json_array_batches(path, field), "parquet": lambda: _parquet_batches(path, field),
               "csv": lambda: _csv_batches(path, field)}
    found = False
    for batch in readers[kind]():
        found = True
        yield batch
    if not found:
        raise DataError(f"{path}: no documents (only blank lines); fix the path or remove the source")


# --------------------------------------------------------------------------- hub datasets

def load_hub(src: DataSource):
    """A hub dataset through `datasets` (downloaded once, Arrow, memory-mapped)."""
    from datasets import load_dataset

    try:
        return load_dataset(src.name, src.subset, split=src.split)
    except Exception as e:  # noqa: BLE001 - hub, network and builder errors all become one line
        raise DataError(f"data source '{src.name}': cannot be loaded ({type(e).__name__}: {str(e)[:300]}); check the "
                        "name, subset and split, or give a local path") from None


def hub_batches(ds, src: DataSource) -> Iterator[TextBatch]:
    field = src.text_field
    if field not in ds.column_names:
        raise DataError(f"data source '{src.name}': no column '{field}' (columns: {', '.join(ds.column_names[:8])}); "
                        "set text_field for this source")
    column = ds.select_columns([field])
    for start in range(0, len(column), BATCH_ROWS):
        values = column[start:start + BATCH_ROWS][field]
        texts = [text_of(v, field, f"{src.name}: row {start + j}", {field: v}) for j, v in enumerate(values)]
        yield TextBatch(texts, list(range(start, start + len(values))), str(src.name), 0)


def hub_identity(ds, src: DataSource) -> dict[str, Any]:
    return {"name": src.name, "subset": src.subset, "split": src.split, "fingerprint": getattr(ds, "_fingerprint", None)}


# --------------------------------------------------------------------------- one source, whatever it is

def source_batches(src: DataSource, hub_ds=None) -> Iterator[TextBatch]:
    """Every document of a source, honouring max_samples."""
    left = src.max_samples
    batches = hub_batches(hub_ds, src) if src.path is None else (
        b for f in local_files(src) for b in file_batches(f, src.text_field))
    for batch in batches:
        if left is not None and len(batch.texts) >= left:
            yield TextBatch(batch.texts[:left], batch.rows[:left], batch.file, batch.nbytes)
            return
        if left is not None:
            left -= len(batch.texts)
        yield batch


def local_identity(src: DataSource) -> list[dict[str, Any]]:
    from tune_launch.training.datacache import file_identity

    return [file_identity(f) for f in local_files(src)]


def local_bytes(src: DataSource) -> int:
    return sum(f.stat().st_size for f in local_files(src))


# --------------------------------------------------------------------------- a bounded sample (tokenizer training)

SAMPLE_WINDOWS = 32


def sample_texts(src: DataSource, budget: int, hub_ds=None) -> list[str]:
    """About `budget` bytes of the source's text. Large uncompressed line files are sampled in SAMPLE_WINDOWS
    windows spread over the file (seeks, not a full read); other sources from their start."""
    texts: list[str] = []
    if src.path is not None:
        files = local_files(src)
        sizes = [f.stat().st_size for f in files]
        for f, size in zip(files, sizes):
            share = max(1, budget * size // max(sum(sizes), 1))
            if kind_of(f) in ("jsonl", "txt") and f.suffix.lower() != ".gz" and size > share:
                texts += _windows(f, kind_of(f), src.text_field, share, size)
            else:
                texts += prefix_texts(file_batches(f, src.text_field), share)
    else:
        texts += prefix_texts(hub_batches(hub_ds, src), budget)
    return texts[: src.max_samples] if src.max_samples else texts


def prefix_texts(batches: Iterator[TextBatch], budget: int) -> list[str]:
    out: list[str] = []
    used = 0
    for batch in batches:
        for text in batch.texts:
            out.append(text)
            used += len(text)
            if used >= budget:
                return out
    return out


def _windows(path: Path, kind: str, field: str, budget: int, size: int) -> list[str]:
    out: list[str] = []
    per_window = max(1, budget // SAMPLE_WINDOWS)
    for w in range(SAMPLE_WINDOWS):
        start = w * size // SAMPLE_WINDOWS
        used = 0
        for pos, line in line_rows(path, start, None):
            text = parse_at(path, pos, line, kind, field)
            if text is not None:
                out.append(text)
                used += len(text)
            if used >= per_window:
                break
    return out
