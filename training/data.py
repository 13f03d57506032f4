"""Rows in, model inputs out: loading sources, the three formats, tokenization and packing.

Pre-training packs whole documents into rows of exactly max_length: `position_ids` restart at 0 for every
document, and no attention mask is passed, so transformers' masking (sdpa/eager: block-diagonal mask found
from the position ids; flash attention: varlen) keeps attention inside each document. Labels are -100 on
padding and on the first token of each document (which would otherwise be predicted from the previous one).
The un-packed path pads per batch with `CausalLMCollator`, which builds labels itself. Either way every
batch carries labels, so "the model did not return a loss" cannot happen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tune_launch.training.config import ConfigError
from tune_launch.training.schema import DataSource, TrainingConfig

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


# --------------------------------------------------------------------------- packing (pure)

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


@dataclass
class CausalLMCollator:
    """Un-packed causal LM batches: right padding, attention mask, labels = ids with -100 on padding."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            row = torch.tensor(f["input_ids"], dtype=torch.long)
            ids[i, : len(row)] = row
            labels[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_batch(batch: dict[str, Any]) -> None:
    """Fail with a clear message, before training, if a batch could not give a loss."""
    if "labels" not in batch:
        raise ConfigError(f"data: batches carry no labels (keys: {sorted(batch)}); the collator must build them")
    if int((batch["labels"] != IGNORE).sum()) == 0:
        raise ConfigError("max_length: the first batch has no token to predict (all labels -100): prompts fill "
                          "max_length; raise max_length or shorten the prompts")


# --------------------------------------------------------------------------- formats (pure)

def alpaca_prompt(instruction: str, inp: str | None) -> str:
    inp = (inp or "").strip()
    return ALPACA_PROMPT.format(extra=", paired with an input that provides further context" if inp else "",
                                instruction=instruction.strip(),
                                input_block=f"### Input:\n{inp}\n\n" if inp else "")


def to_sft_row(row: dict[str, Any], fmt: str, src: DataSource, index: int | None = None) -> dict[str, Any]:
    """One row in TRL's shapes: {"text"}, {"prompt","completion"} strings, or conversational prompt/completion.
    `index` (the row's position in its source) only names the row in errors."""
    if fmt == "text":
        return {"text": row[src.text_field]}
    if fmt == "alpaca" and src.template is not None:  # data.train[].template (training/templates.py)
        from tune_launch.training.templates import prompt_completion

        return prompt_completion(row, src, index)
    if fmt == "alpaca":
        return {"prompt": alpaca_prompt(row["instruction"], row.get("input")), "completion": str(row["output"])}
    messages = list(row[src.messages_field])
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"data: a chat row must end with an assistant message ({src.path or src.name})")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


# --------------------------------------------------------------------------- loading

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


def raw_splits(cfg: TrainingConfig) -> tuple[list[tuple[list[dict], DataSource]], list[tuple[list[dict], DataSource]]]:
    """(train, eval) as lists of (rows, source); synthetic data is generated here, in memory."""
    if cfg.data.generate is not None:
        from tune_launch.training import synthetic

        g = cfg.data.generate
        train, ev = synthetic.generate(g.kind, g.train_samples, g.eval_samples, g.seed)
        fmt = "text" if g.kind == "pretrain" else g.kind
        src = DataSource(name="synthetic", format=fmt)
        return [(train, src)], [(ev, src)]
    train = [(load_source(s, cfg.data.num_proc).to_list(), s) for s in cfg.data.train or []]
    ev = [(load_source(s, cfg.data.num_proc).to_list(), s) for s in cfg.data.eval or []]
    if not ev and cfg.data.eval_fraction > 0:
        import random

        rows = [(r, s) for rs, s in train for r in rs]
        random.Random(cfg.seed).shuffle(rows)
        cut = max(1, int(len(rows) * cfg.data.eval_fraction))
        ev = [([r for r, _ in rows[:cut]], train[0][1])] if rows else []
        train = [([r for r, _ in rows[cut:]], train[0][1])]
    return train, ev


def texts(parts: list[tuple[list[dict], DataSource]]) -> list[str]:
    return [str(r[s.text_field]) for rows, s in parts for r in rows]


def pretrain_dataset(parts: list[tuple[list[dict], DataSource]], tokenizer, cfg: TrainingConfig):
    """Tokenized pre-training rows: packed (input_ids, position_ids, labels) or plain input_ids."""
    from datasets import Dataset

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and cfg.packing else []
    docs = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in texts(parts)]
    if cfg.packing:
        from tune_launch.training.packing import pack_best_fit

        rows = pack_best_fit(docs, cfg.max_length, pad_id(tokenizer))  # <1% padding instead of ~16% in order
        return Dataset.from_list(rows)
    return Dataset.from_list([{"input_ids": d[: cfg.max_length]} for d in docs if len(d) >= 2])


def sft_dataset(parts: list[tuple[list[dict], DataSource]]):
    from datasets import Dataset

    return Dataset.from_list([to_sft_row(r, s.format, s, i) for rows, s in parts for i, r in enumerate(rows)])


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def collator_for(cfg: TrainingConfig, tokenizer):
    """Pre-training collator: stacking for packed rows (all max_length), padding otherwise."""
    if cfg.packing:
        from transformers import default_data_collator

        return default_data_collator
    return CausalLMCollator(pad_id(tokenizer))
