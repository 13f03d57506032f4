"""`data.streaming: true`: read, tokenize and pack on the fly, each rank its own share, resumable exactly.

A background thread reads this rank's units (training/stream_units.py), tokenizes in batches and packs a
round of `data.stream_buffer_rows` rows' worth of documents at a time (best fit decreasing, as the cached path),
so memory is bounded by one round and a queue of two. Rows look exactly like the cached path's.

Exact resume without replay: a round carries where the reading stood after its last document. A checkpoint at
step S records, per rank, the rows consumed so far (S x accumulation x micro batch), the reading position after
the round holding the next row, and that round's unconsumed rows themselves (at most one round of tokens). A
resumed run yields those rows, then reads on from the position: no consumed batch is read, tokenized or skipped
again. Positions are per rank, so a stream resumes only with the world size, batch and accumulation it was saved
with (one line says so otherwise).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_launch.training.datacache import digest
from tune_launch.training.encode import Encoder, special_ids
from tune_launch.training.packing import fill_rows, pack_plan, row_arrays
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.sources import DataError
from tune_launch.training.stream_units import all_units, rank_units, read_unit

log = logging.getLogger("tune_launch")
POSITIONS = "data_position"
TEXT_BATCH = 128


@dataclass(frozen=True)
class Cursor:
    """Where reading stands: epoch, index into this epoch's unit order, position inside that unit."""

    epoch: int = 0
    unit: int = 0
    position: Any = None


@dataclass
class Round:
    """Packed rows from one buffer of documents, and where reading stood after them."""

    rows: np.ndarray  # n x max_length
    pieces: np.ndarray  # int32 piece lengths, row order
    offsets: np.ndarray  # n + 1 into pieces
    after: Cursor
    first: int = 0  # global index of rows[0] in this rank's stream

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict[str, np.ndarray]:
        return row_arrays(self.rows[i], self.pieces[self.offsets[i]:self.offsets[i + 1]])

    def tail(self, k: int) -> Round:
        lo = int(self.offsets[k])
        return Round(self.rows[k:], self.pieces[lo:], self.offsets[k:] - lo, self.after, self.first + k)


class PackedStream(torch.utils.data.IterableDataset):
    """This rank's packed rows, forever (epochs repeat in a new unit order); see the module docstring."""

    def __init__(self, cfg: TrainingConfig, tokenizer, rank: int, world: int, keep_rows: int = 4096) -> None:
        from tune_launch.training.data import pad_id
        from tune_launch.training.rowstore import token_dtype

        self.cfg, self.rank, self.world = cfg, rank, world
        self.units = rank_units(all_units(cfg, world), rank, world)
        if not self.units:
            raise DataError(f"data.streaming: rank {rank} of {world} gets no part of the data (fewer files/blocks "
                            "than ranks); use fewer processes or more data files")
        self.units_digest = digest([u.describe() for u in self.units])
        self.encoder = Encoder(tokenizer, *special_ids(tokenizer, True))
        self.pad, self.dtype, self.max_length = pad_id(tokenizer), token_dtype(len(tokenizer)), cfg.max_length
        self.round_tokens = cfg.data.stream_buffer_rows * cfg.max_length
        self.keep_rows = keep_rows
        self._start = Round(np.zeros((0, cfg.max_length), self.dtype), np.zeros(0, np.int32), np.zeros(1, np.int64),
                            Cursor())
        self._history: deque[Round] = deque()
        self._yielded = 0

    # ----------------------------------------------------------------------- producing
    def _order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.units)).tolist()

    def _documents(self, cursor: Cursor):
        """(cursor after, text) from `cursor` on, epoch after epoch."""
        epoch, start, position = cursor.epoch, cursor.unit, cursor.position
        while True:
            read_any = False
            order = self._order(epoch)
            for k in range(start, len(order)):
                for pos, text in read_unit(self.units[order[k]], position, self.cfg, self.rank, self.world):
                    read_any = True
                    yield Cursor(epoch, k, pos), text
                position = None
                yield Cursor(epoch, k + 1, None), None  # unit done: a resume starts at the next one
            if not read_any and start == 0:
                raise DataError(f"data.streaming: rank {self.rank}'s share of the data has no document")
            epoch, start = epoch + 1, 0

    def _rounds(self, cursor: Cursor, stop: threading.Event):
        texts: list[str] = []
        tokens: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        buffered = 0
        for after, text in self._documents(cursor):
            if stop.is_set():
                return
            if text is not None:
                texts.append(text)
            if len(texts) >= TEXT_BATCH or (text is None and texts):
                t, n = self.encoder(texts)
                texts = []
                tokens.append(t)
                lengths.append(n)
                buffered += len(t)
            if buffered >= self.round_tokens and not texts:
                yield self._pack(np.concatenate(tokens), np.concatenate(lengths), after)
                tokens, lengths, buffered = [], [], 0

    def _pack(self, tokens: np.ndarray, lengths: np.ndarray, after: Cursor) -> Round:
        plan = pack_plan(lengths, self.max_length)
        n = len(plan[3]) - 1
        rows = fill_rows(tokens, np.cumsum(lengths) - lengths, plan, 0, n, self.max_length, self.pad, self.dtype)
        return Round(rows, plan[2].astype(np.int32), plan[3].astype(np.int64), after)

    def _produce(self, cursor: Cursor, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for r in self._rounds(cursor, stop):
                while not stop.is_set():
                    try:
                        out.put(r, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            out.put(e)

    # ----------------------------------------------------------------------- consuming
    def __iter__(self):
        start = self._start
        self._history = deque([start])
        self._yielded = start.first
        stop = threading.Event()
        rounds: queue.Queue = queue.Queue(maxsize=2)
        thread = threading.Thread(target=self._produce, args=(start.after, rounds, stop), daemon=True,
                                  name=f"tune-launch-stream-rank{self.rank}")
        thread.start()
        try:
            current, next_first = start, start.first + len(start)
            while True:
                for i in range(len(current)):
                    yield current.row(i)
                    self._yielded = current.first + i + 1
                got = rounds.get()
                if isinstance(got, BaseException):
                    raise got
                got.first, next_first = next_first, next_first + len(got)
                self._history.append(got)
                while len(self._history) > 2 and self._history[1].first + self.keep_rows < self._yielded:
                    self._history.popleft()
                current = got
        finally:
            stop.set()

    def preview(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first n rows this rank would train on, read by a separate reader (the stream is not advanced)."""
        if len(self._start) >= n:
            return [self._start.row(i) for i in range(n)]
        stop = threading.Event()
        for r in self._rounds(self._start.after, stop):
            rows = [self._start.row(i) for i in range(len(self._start))] + [r.row(i) for i in range(len(r))]
            if len(rows) >= n:
                stop.set()
                return rows[:n]
        return []

    # ----------------------------------------------------------------------- positions in checkpoints
    def position_at(self, consumed: int) -> Round:
        """What to resume from after `consumed` rows: the unconsumed rest of the round holding row `consumed`."""
        for r in self._history:
            if r.first <= consumed < r.first + len(r) or (consumed == r.first + len(r) and r is self._history[-1]):
                return r.tail(consumed - r.first)
        raise DataError(f"data.streaming: row {consumed} is no longer held (rows {self._history[0].first}.."
                        f"{self._history[-1].first + len(self._history[-1])}); raise the stream's history")

    def save_position(self, folder: Path, consumed: int, batch: int, accumulation: int) -> None:
        r = self.position_at(consumed)
        out = Path(folder) / POSITIONS
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"rank{self.rank}.npz", rows=r.rows, pieces=r.pieces, offsets=r.offsets)
        meta = {"rank": self.rank, "world_size": self.world, "consumed": consumed, "batch": batch,
                "accumulation": accumulation, "units": self.units_digest,
                "epoch": r.after.epoch, "unit": r.after.unit, "position": r.after.position}
        (out / f"rank{self.rank}.json").write_text(json.dumps(meta, sort_keys=True))

    def load_position(self, checkpoint: Path, batch: int, accumulation: int) -> None:
        folder = Path(checkpoint) / POSITIONS
        try:
            meta = json.loads((folder / f"rank{self.rank}.json").read_text())
            arrays = np.load(folder / f"rank{self.rank}.npz")
        except (OSError, ValueError) as e:
            raise DataError(f"data.streaming: {checkpoint} holds no stream position for rank {self.rank} ({e}); it was "
                            "not written by a streaming run; use checkpoint.resume: never or another output_dir") from None
        want = {"world_size": self.world, "batch": batch, "accumulation": accumulation}
        for key, value in want.items():
            if meta.get(key) != value:
                raise DataError(f"data.streaming: {checkpoint} was saved with {key} {meta.get(key)}, this run has {value}; "
                                "stream positions are per rank and per batch: resume with the same processes, "
                                "micro batch and accumulation")
        if meta.get("units") != self.units_digest:
            raise DataError(f"data.streaming: the data files changed since {checkpoint} was saved (their blocks "
                            "differ); restore them, or start over with checkpoint.resume: never")
        after = Cursor(int(meta["epoch"]), int(meta["unit"]), meta["position"])
        self._start = Round(arrays["rows"], arrays["pieces"], arrays["offsets"], after, int(meta["consumed"]))
        log.info("data.streaming: rank %d resumes at row %d (epoch %d, unit %d of %d), %d rows carried in the checkpoint",
                 self.rank, meta["consumed"], after.epoch, after.unit, len(self.units), len(self._start))


class StreamingTrainerMixin:
    """Trainer mixin for PackedStream: a per-rank dataloader (accelerate must not shard it again), the stream's
    position saved with each checkpoint (beside the per-rank RNG state) and restored before training."""

    def get_train_dataloader(self):  # type: ignore[override]
        ds = self.train_dataset  # type: ignore[attr-defined]
        if not isinstance(ds, PackedStream):
            return super().get_train_dataloader()  # type: ignore[misc]
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        args = self.args  # type: ignore[attr-defined]
        ds.keep_rows = max(ds.keep_rows, 4 * args.per_device_train_batch_size * args.gradient_accumulation_steps + 64)
        loader = DataLoader(ds, batch_size=args.per_device_train_batch_size, collate_fn=self.data_collator,  # type: ignore[attr-defined]
                            num_workers=0, pin_memory=args.dataloader_pin_memory)
        return prepare_data_loader(loader, device=args.device, num_processes=1, process_index=0, put_on_device=True,
                                   dispatch_batches=False, rng_types=None)

    def _save_rng_state(self, output_dir):  # type: ignore[override]
        super()._save_rng_state(output_dir)  # type: ignore[misc]
        ds = self.train_dataset  # type: ignore[attr-defined]
        if isinstance(ds, PackedStream):
            a = self.args  # type: ignore[attr-defined]
            consumed = self.state.global_step * a.gradient_accumulation_steps * a.per_device_train_batch_size  # type: ignore[attr-defined]
            ds.save_position(Path(output_dir), consumed, a.per_device_train_batch_size, a.gradient_accumulation_steps)

    _rng_after_first_fetch: str | None = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):  # type: ignore[override]
        ds = self.train_dataset  # type: ignore[attr-defined]
        if isinstance(ds, PackedStream) and resume_from_checkpoint:
            a = self.args  # type: ignore[attr-defined]
            ds.load_position(Path(resume_from_checkpoint), a.per_device_train_batch_size, a.gradient_accumulation_steps)
            self._rng_after_first_fetch = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def get_batch_samples(self, *args, **kwargs):  # type: ignore[override]
        """Creating the dataloader iterator draws from torch's RNG: restore the checkpoint's RNG after the first
        fetch, as the Trainer does after skipping batches on the map-style path, so dropout continues exactly."""
        out = super().get_batch_samples(*args, **kwargs)  # type: ignore[misc]
        if self._rng_after_first_fetch is not None:
            self._load_rng_state(self._rng_after_first_fetch)  # type: ignore[attr-defined]
            self._rng_after_first_fetch = None
        return out


def preview_rows(dataset, n: int) -> list[dict[str, Any]]:
    """The first n training rows, without consuming a stream."""
    if isinstance(dataset, PackedStream):
        return dataset.preview(n)
    return [dataset[i] for i in range(min(n, len(dataset)))]
