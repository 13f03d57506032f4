"""The pre-training data path as it was before the prepared-data cache (commit 753535b), kept verbatim for the
benchmark's baseline and as reference implementations in tests. Not used by tune-launch itself.

`load_source(...).to_list()` for every source, one tokenizer call per document in a Python loop, packing in
Python lists (best fit decreasing with `bisect.insort`, or greedy in order), `Dataset.from_list`, on every rank.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from tune_launch.training.schema import DataSource, TrainingConfig

IGNORE = -100


def pack_documents(docs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Greedy packing of token lists into rows of max_length; a longer document is cut into pieces."""
    pieces: list[Sequence[int]] = []
    for doc in docs:
        pieces.extend(doc[i:i + max_length] for i in range(0, len(doc), max_length))
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        if len(piece) < 2:
            continue  # nothing to predict
        if len(ids) + len(piece) > max_length:
            rows.append(_pad_row(ids, pos, labels, max_length, pad_id))
            ids, pos, labels = [], [], []
        ids.extend(piece)
        pos.extend(range(len(piece)))
        labels.extend([IGNORE, *piece[1:]])
    if ids:
        rows.append(_pad_row(ids, pos, labels, max_length, pad_id))
    return rows


def _pad_row(ids: list[int], pos: list[int], labels: list[int], max_length: int, pad_id: int) -> dict[str, list[int]]:
    n = max_length - len(ids)
    return {"input_ids": ids + [pad_id] * n, "position_ids": pos + list(range(n)), "labels": labels + [IGNORE] * n}


def best_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, longest first, each into the tightest fit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack_best_fit(docs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Rows of exactly max_length from token lists; a longer document is cut into max_length pieces first."""
    pieces = [doc[i:i + max_length] for doc in docs for i in range(0, len(doc), max_length)]
    pieces = [p for p in pieces if len(p) >= 2]  # nothing to predict otherwise
    rows = []
    for group in best_fit_bins([len(p) for p in pieces], max_length):
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        for i in sorted(group):  # keep the corpus order inside a row
            piece = list(pieces[i])
            ids.extend(piece)
            pos.extend(range(len(piece)))
            labels.extend([IGNORE, *piece[1:]])
        rows.append(_pad_row(ids, pos, labels, max_length, pad_id))
    return rows


def load_source(src: DataSource, num_proc: int | None = None):
    """A `datasets.Dataset` from a local file or a dataset name."""
    from datasets import load_dataset

    if src.path is not None:
        path = src.path
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}.get(
            "." + path.rsplit(".", 1)[-1].lower(), "json")
        ds = load_dataset(kind, data_files=path, split="train", num_proc=num_proc)
    else:
        ds = load_dataset(src.name, src.subset, split=src.split, num_proc=num_proc)
    if src.max_samples is not None:
        ds = ds.select(range(min(src.max_samples, len(ds))))
    return ds


def texts(parts) -> list[str]:
    return [str(r[s.text_field]) for rows, s in parts for r in rows]


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def pretrain_dataset(parts, tokenizer, cfg: TrainingConfig):
    """Tokenized pre-training rows: packed (input_ids, position_ids, labels) or plain input_ids."""
    from datasets import Dataset

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and cfg.packing else []
    docs = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in texts(parts)]
    if cfg.packing:
        rows = pack_best_fit(docs, cfg.max_length, pad_id(tokenizer))  # <1% padding instead of ~16% in order
        return Dataset.from_list(rows)
    return Dataset.from_list([{"input_ids": d[: cfg.max_length]} for d in docs if len(d) >= 2])


def prepare_old(cfg: TrainingConfig, tokenizer):
    """What every rank did before: load every train source into Python lists, tokenize, pack (no eval split)."""
    train = [(load_source(s, cfg.data.num_proc).to_list(), s) for s in cfg.data.train or []]
    return pretrain_dataset(train, tokenizer, cfg)
