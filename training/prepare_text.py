"""Pre-training data into a cache entry: read in batches, tokenize in batches, pack window by window, write.

Nothing holds the corpus: a batch of text is read, tokenized into numpy and added to the split's writer, which
packs and writes a window of documents at a time (training/rowstore.py). Peak memory is the window, the
tokenizer and one batch, whatever the corpus size.

Eval split: `data.eval` sources, the generated eval rows of `data.generate`, or, with `data.eval_fraction` f,
every document whose running count crosses a multiple of 1/f (document 0, then about every 1/f-th): exact to
one document, deterministic, spread over the whole corpus, and at least one document whenever f > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tune_launch.training.encode import Encoder, encode_batches, special_ids
from tune_launch.training.prepare_progress import Progress
from tune_launch.training.rowstore import SplitWriter, token_dtype
from tune_launch.training.schema import DataSource, TrainingConfig
from tune_launch.training.sources import TextBatch, source_batches


@dataclass(frozen=True)
class Part:
    """One source feeding one split."""

    split: str  # train | eval
    label: str
    batches: Callable[[], Iterator[TextBatch]]
    src: DataSource | None = None


def generated_batches(rows: list[dict], label: str, field: str = "text") -> Callable[[], Iterator[TextBatch]]:
    def batches() -> Iterator[TextBatch]:
        for i in range(0, len(rows), 1000):
            chunk = rows[i:i + 1000]
            yield TextBatch([str(r[field]) for r in chunk], list(range(i, i + len(chunk))), label, 0)
    return batches


def text_parts(cfg: TrainingConfig, hubs: dict[int, Any]) -> list[Part]:
    """Every (split, source) in the order they are prepared. `hubs` maps id(source) -> loaded hub dataset."""
    d = cfg.data
    if d.generate is not None:
        from tune_launch.training import synthetic

        g = d.generate
        train, ev = synthetic.generate(g.kind, g.train_samples, g.eval_samples, g.seed)
        return [Part("train", "generated", generated_batches(train, "generated")),
                Part("eval", "generated", generated_batches(ev, "generated eval"))]
    parts = [Part("train", _label(s), _batches_of(s, hubs), s) for s in d.train or []]
    parts += [Part("eval", _label(s), _batches_of(s, hubs), s) for s in d.eval or []]
    return parts


def _label(src: DataSource) -> str:
    return str(src.path if src.path is not None else src.name)


def _batches_of(src: DataSource, hubs: dict[int, Any]) -> Callable[[], Iterator[TextBatch]]:
    return lambda: source_batches(src, hubs.get(id(src)))


def held_out(first: int, count: int, fraction: float) -> np.ndarray:
    """Which of documents first..first+count-1 go to eval under eval_fraction (see the module docstring)."""
    i = np.arange(first, first + count, dtype=np.float64)
    phase = 1.0 - fraction
    return np.floor((i + 1) * fraction + phase) > np.floor(i * fraction + phase)


def _split_docs(tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> tuple[tuple, tuple]:
    per_token = np.repeat(mask, lengths)
    return (tokens[per_token], lengths[mask]), (tokens[~per_token], lengths[~mask])


def write_pretrain(cfg: TrainingConfig, tokenizer, parts: list[Part], build: Path, progress: Progress,
                   tokenizer_dir: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokenize and pack every part into `build`; returns (files manifest, summary)."""
    from tune_launch.training.data import pad_id

    bos, eos = special_ids(tokenizer, cfg.packing)
    dtype = token_dtype(len(tokenizer))
    fraction = cfg.data.eval_fraction if cfg.data.generate is None and not cfg.data.eval else 0.0
    splits = {p.split for p in parts} | ({"eval"} if fraction > 0 else set())
    writers = {s: SplitWriter(build, s, cfg.max_length, cfg.packing, pad_id(tokenizer), dtype) for s in sorted(splits)}
    encoder = Encoder(tokenizer, bos, eos)
    seen = 0  # documents of the train sources so far (eval_fraction counts them)
    for part in parts:
        read = {}
        for batch, tokens, lengths in encode_batches(part.batches(), encoder, cfg.data.num_proc, tokenizer_dir):
            if part.split == "train" and fraction > 0:
                held = held_out(seen, len(lengths), fraction)
                (ev_t, ev_l), (tr_t, tr_l) = _split_docs(tokens, lengths, held)
                writers["eval"].add(ev_t, ev_l)
                writers["train"].add(tr_t, tr_l)
                seen += len(lengths)
            else:
                writers[part.split].add(tokens, lengths)
            grown = batch.nbytes - read.get(batch.file, 0)
            read[batch.file] = batch.nbytes
            progress.advance(len(batch.texts), len(tokens), max(grown, 0))
    files: dict[str, Any] = {}
    for w in writers.values():
        files.update(w.close())
    summary = {"splits": {s: w.stats() for s, w in writers.items()}, "max_length": cfg.max_length,
               "packing": cfg.packing, "dtype": dtype.name, "read_documents": progress.docs, "streaming": cfg.data.streaming,
               "tokenized": progress.tokens, "seconds": progress.seconds, "tokens_per_second": progress.tokens_per_second}
    if not cfg.data.streaming and not (writers.get("train") and writers["train"].rows):
        from tune_launch.training.sources import DataError

        raise DataError("data.train: no document has a token to train on (every text is empty); check the sources")
    return files, summary
