"""What a streaming rank reads: the sources cut into units (byte blocks, row groups, files), dealt to ranks.

Line files (.jsonl, .txt, uncompressed) are cut into byte blocks; a line belongs to the block where it starts,
so every line is read by exactly one rank and a rank seeks straight to its blocks (no rank reads the whole
corpus). Parquet files are cut by row group; other files are one unit each; hub datasets are streamed by
`datasets` and split across ranks with `split_dataset_by_node`. A unit reads from a position (byte offset, row,
or the hub stream's state) and says where it stands after each document, which is what a checkpoint records.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_launch.training.schema import DataSource, TrainingConfig
from tune_launch.training.sources import (DataError, file_batches, kind_of, line_rows, local_files, parse_at,
                                          text_of)

MIN_BLOCK, MAX_BLOCK, BLOCKS_PER_RANK = 4096, 64 << 20, 16


@dataclass(frozen=True)
class Unit:
    kind: str  # lines | parquet | file | generated | hub
    label: str
    path: str = ""
    start: int = 0  # bytes (lines), row group (parquet), first row (generated)
    end: int = 0
    field: str = "text"
    source: int = 0  # index of the source in data.train

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "start": self.start, "end": self.end}


def block_size(size: int, world: int) -> int:
    return max(MIN_BLOCK, min(MAX_BLOCK, -(-size // (BLOCKS_PER_RANK * max(world, 1)))))


def all_units(cfg: TrainingConfig, world: int) -> list[Unit]:
    """Every unit of the training sources, in a fixed order (the same on every rank)."""
    d = cfg.data
    units: list[Unit] = []
    if d.generate is not None:
        g = d.generate
        for start in range(0, g.train_samples, 256):
            units.append(Unit("generated", "generated", start=start, end=min(start + 256, g.train_samples)))
        return units
    for i, src in enumerate(d.train or []):
        if src.path is None:
            units.append(Unit("hub", str(src.name), source=i, field=src.text_field))
            continue
        for f in local_files(src):
            units += _file_units(f, src, i, world)
    return units


def _file_units(f: Path, src: DataSource, index: int, world: int) -> list[Unit]:
    kind, size = kind_of(f), f.stat().st_size
    if size == 0:
        raise DataError(f"{f}: empty file, no documents; fix the path or remove the source")
    if kind in ("jsonl", "txt") and f.suffix.lower() != ".gz":
        step = block_size(size, world)
        return [Unit("lines", str(f), str(f), s, min(s + step, size), src.text_field, index) for s in range(0, size, step)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        groups = pq.ParquetFile(f).metadata.num_row_groups
        return [Unit("parquet", str(f), str(f), g, g + 1, src.text_field, index) for g in range(groups)]
    return [Unit("file", str(f), str(f), 0, 0, src.text_field, index)]


def rank_units(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """This rank's share: every world-th unit; hub units are read by every rank (the hub stream splits itself)."""
    return [u for i, u in enumerate(units) if u.kind == "hub" or i % world == rank]


def read_unit(unit: Unit, position: Any, cfg: TrainingConfig, rank: int, world: int) -> Iterator[tuple[Any, str]]:
    """(position after the document, text) from `position` (None: the unit's start) to the unit's end."""
    if unit.kind == "lines":
        kind = kind_of(Path(unit.path))
        path = Path(unit.path)
        for pos, line in line_rows(path, unit.start if position is None else int(position), unit.end):
            text = parse_at(path, pos, line, "jsonl" if kind == "jsonl" else "txt", unit.field)
            if text is not None:
                yield pos, text
    elif unit.kind == "parquet":
        yield from _parquet_rows(unit, int(position or 0))
    elif unit.kind == "generated":
        g = cfg.data.generate
        rows = _generated(g.kind, g.train_samples, g.seed)
        for i in range(unit.start if position is None else int(position), unit.end):
            yield i + 1, str(rows[i]["text"])
    elif unit.kind == "hub":
        yield from _hub_rows(unit, position, cfg, rank, world)
    else:
        skip = int(position or 0)
        n = 0
        for batch in file_batches(Path(unit.path), unit.field):
            for text in batch.texts:
                n += 1
                if n > skip:
                    yield n, text


@functools.lru_cache(maxsize=2)
def _generated(kind: str, n: int, seed: int) -> list[dict]:
    from tune_launch.training import synthetic

    return synthetic.generate(kind, n, 1, seed)[0]


def _parquet_rows(unit: Unit, skip: int) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(unit.path).read_row_group(unit.start, columns=[unit.field])
    values = table.column(0).to_pylist()
    for i in range(skip, len(values)):
        yield i + 1, text_of(values[i], unit.field, f"{unit.path}: row group {unit.start} row {i}", {unit.field: values[i]})


def _hub_rows(unit: Unit, position: Any, cfg: TrainingConfig, rank: int, world: int) -> Iterator[tuple[Any, str]]:
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    src = (cfg.data.train or [])[unit.source]
    try:
        ds = load_dataset(src.name, src.subset, split=src.split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"data source '{src.name}': cannot be streamed ({type(e).__name__}: {str(e)[:300]})") from None
    ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    if position is not None:
        ds.load_state_dict(json.loads(position))
    for i, row in enumerate(ds):
        yield json.dumps(ds.state_dict()), text_of(row.get(unit.field), unit.field, f"{src.name}: streamed row {i}", row)
