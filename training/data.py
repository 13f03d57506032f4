"""Rows in, model inputs out: the three formats (text, alpaca, chat) and the collators.

Pre-training packs whole documents into rows of exactly max_length (training/packing.py, prepared once into the
cache by training/prepare.py): `position_ids` restart at 0 for every document, and no attention mask is passed,
so transformers' masking (sdpa/eager: block-diagonal mask found from the position ids; flash attention: varlen)
keeps attention inside each document. Labels are -100 on padding and on the first token of each document (which
would otherwise be predicted from the previous one). The un-packed path pads per batch with `CausalLMCollator`,
which builds labels itself. Either way every batch carries labels, so "the model did not return a loss" cannot
happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tune_launch.training.config import ConfigError
from tune_launch.training.packing import IGNORE
from tune_launch.training.schema import DataSource, TrainingConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


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
