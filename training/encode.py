"""Batched tokenization into numpy: documents back to back plus their lengths, with BOS/EOS added.

The fast tokenizer's Rust `encode_batch` does the work (it releases the GIL and uses every core); only the ids
come back to Python, with no attention masks or offsets. `data.num_proc` > 1 adds worker processes, each
tokenizing whole batches single-threaded, for machines where one Python process cannot feed enough cores; the
batches stay in corpus order and at most 2 x num_proc are in flight, so memory stays bounded.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def special_ids(tokenizer, packing: bool) -> tuple[int | None, int | None]:
    """(BOS, EOS) added around each pre-training document: BOS only when packing (it marks where a document
    starts inside a row), EOS whenever the tokenizer has one."""
    bos = tokenizer.bos_token_id if packing else None
    return bos, tokenizer.eos_token_id


class Encoder:
    """texts -> (tokens int32, lengths int64); documents with no token are dropped."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self.bos, self.eos = bos, eos

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None and hasattr(self.backend, "encode_batch"):
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.wrap(self.ids(texts))

    def wrap(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        content = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(content.sum()))
        keep = content > 0
        if not keep.all():
            content = content[keep]
        extra = (self.bos is not None) + (self.eos is not None)
        if not extra:
            return flat, content
        lengths = content + extra
        out = np.empty(int(lengths.sum()), dtype=np.int32)
        starts = np.cumsum(lengths) - lengths
        doc_of = np.repeat(np.arange(len(content)), content)
        out[np.arange(len(flat)) + doc_of * extra + (self.bos is not None)] = flat
        if self.bos is not None:
            out[starts] = self.bos
        if self.eos is not None:
            out[starts + lengths - 1] = self.eos
        return out, lengths


# --------------------------------------------------------------------------- worker processes (data.num_proc > 1)

_WORKER: Encoder | None = None


def _init_worker(tokenizer_dir: str, bos: int | None, eos: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    from transformers import AutoTokenizer

    global _WORKER
    _WORKER = Encoder(AutoTokenizer.from_pretrained(tokenizer_dir), bos, eos)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER(texts)


def encode_batches(batches: Iterable[Any], encoder: Encoder, num_proc: int | None,
                   tokenizer_dir: str | None = None) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(batch, tokens, lengths) for every batch (anything with .texts), in order."""
    if not num_proc or num_proc <= 1 or tokenizer_dir is None:
        for batch in batches:
            yield (batch, *encoder(batch.texts))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork would copy the Rust thread pool's state
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_dir, encoder.bos, encoder.eos)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch.texts,))))
            if len(pending) >= 2 * num_proc:
                done, result = pending.popleft()
                yield (done, *result.get())
        while pending:
            done, result = pending.popleft()
            yield (done, *result.get())
