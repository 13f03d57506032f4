"""SFT data into a cache entry, Arrow end to end: sources -> TRL-shaped rows -> TRL's own tokenization -> saved.

Rows are formatted by `data.to_sft_row` inside a batched `Dataset.map` (written to Arrow files in the build
folder, never a Python list of the corpus). TRL then tokenizes, masks and packs them exactly as SFTTrainer
would (`SFTTrainer._prepare_dataset`, called here once, by the one preparing process), and the result is saved
with `save_to_disk`. Every rank loads it memory-mapped and hands it to SFTTrainer with
`dataset_kwargs={"skip_prepare_dataset": True}`, so TRL never tokenizes again on any rank or restart.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tune_launch.training.data import to_sft_row
from tune_launch.training.schema import DataSource, TrainingConfig
from tune_launch.training.sources import DataError, local_files, load_hub

RAW_LOADERS = {"jsonl": "json", "json": "json", "txt": "text", "parquet": "parquet", "csv": "csv"}
# SFTConfig fields that change what _prepare_dataset produces (the cache key holds their values)
PREP_FIELDS = ("max_length", "packing", "packing_strategy", "eval_packing", "completion_only_loss",
               "assistant_only_loss", "dataset_text_field", "shuffle_dataset", "seed", "truncation_mode",
               "padding_free", "eos_token", "pad_token", "chat_template_path")


def prep_settings(args) -> dict[str, Any]:
    return {f: getattr(args, f, None) for f in PREP_FIELDS}


def _required(fmt: str, src: DataSource) -> tuple[str, ...]:
    """Fields a row cannot do without (a template names its own, and renders a null as empty)."""
    if src.template is not None:
        return ()
    return {"alpaca": ("instruction", "output"), "chat": (src.messages_field,)}.get(fmt, (src.text_field,))


def _format_batch(batch: dict[str, list], indices: list[int], fmt: str, src: DataSource, label: str) -> dict[str, list]:
    keys = list(batch)
    out: dict[str, list] = {}
    needed = _required(fmt, src)
    for i, values in zip(indices, zip(*batch.values())):
        row = dict(zip(keys, values))
        for field in needed:  # Arrow fills a field missing from some rows with null
            if row.get(field) is None:
                fields = ", ".join(sorted(k for k, v in row.items() if v is not None)[:8])
                raise DataError(f"{label}: row {i}: no field '{field}' (fields: {fields}); fix the row or the "
                                f"source's format ({fmt})")
        try:
            formatted = to_sft_row(row, fmt, src, i)
        except KeyError as e:
            fields = ", ".join(sorted(map(str, row))[:8])
            raise DataError(f"{label}: row {i}: no field {e} (fields: {fields}); fix the row or the source's "
                            f"format ({fmt})") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{label}: row {i}: {str(e).removeprefix('data: ')}") from None
        for k, v in formatted.items():
            out.setdefault(k, []).append(v)
    return out


def format_sft(ds, src: DataSource, label: str | None = None, num_proc: int | None = None,
               cache_file: str | None = None):
    """TRL-shaped rows from a source's Arrow rows: `to_sft_row` on every row, inside a batched map."""
    label = label or str(src.path if src.path is not None else src.name)
    return ds.map(_format_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                  fn_kwargs={"fmt": src.format, "src": src, "label": label}, num_proc=num_proc,
                  cache_file_name=cache_file, desc=f"formatting {label}")


def _raw(src: DataSource, cache_dir: Path, hubs: dict[int, Any]):
    """The source as an Arrow dataset (datasets' loaders write Arrow files, read memory-mapped)."""
    from datasets import load_dataset

    from tune_launch.training.sources import kind_of

    if src.path is None:
        return (hubs[id(src)] if id(src) in hubs else load_hub(src)), str(src.name)
    files = [str(f) for f in local_files(src)]
    for f in files:
        if Path(f).stat().st_size == 0:
            raise DataError(f"{f}: empty file, no rows; fix the path or remove the source")
    kind = RAW_LOADERS[kind_of(Path(files[0]))]
    try:
        ds = load_dataset(kind, data_files=files, split="train", cache_dir=str(cache_dir))
    except Exception as e:  # noqa: BLE001 - a bad file surfaces as one of several builder errors
        raise DataError(f"{src.path}: cannot be read as {kind} ({type(e).__name__}: {str(e)[:300]}); fix the file") from None
    return ds, str(src.path)


def sft_rows(cfg: TrainingConfig, build: Path, hubs: dict[int, Any]):
    """(train, eval) Arrow datasets of TRL-shaped rows (eval may be None)."""
    from datasets import Dataset, concatenate_datasets

    import sys

    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # a log file gets the summary line, not a bar per map
    d = cfg.data
    num_proc = d.num_proc
    if d.generate is not None:
        from tune_launch.training import synthetic

        g = d.generate
        train_rows, eval_rows = synthetic.generate(g.kind, g.train_samples, g.eval_samples, g.seed)
        src = DataSource(name="synthetic", format=g.kind)
        pairs = {"train": [(Dataset.from_list(train_rows), src, "generated")],
                 "eval": [(Dataset.from_list(eval_rows), src, "generated eval")]}
    else:
        pairs = {"train": [], "eval": []}
        for split, sources in (("train", d.train or []), ("eval", d.eval or [])):
            for s in sources:
                ds, label = _raw(s, build / "raw", hubs)
                pairs[split].append((ds, s, label))
    out = {}
    for split, items in pairs.items():
        parts = []
        for i, (ds, src, label) in enumerate(items):
            if src.max_samples is not None:
                ds = ds.select(range(min(src.max_samples, len(ds))))
            if len(ds) == 0:
                raise DataError(f"{label}: no rows; fix the path or remove the source")
            parts.append(format_sft(ds, src, label, num_proc, str(build / f"rows-{split}-{i}.arrow")))
        out[split] = concatenate_datasets(parts) if len(parts) > 1 else (parts[0] if parts else None)
    train, ev = out["train"], out.get("eval")
    if ev is None and d.eval_fraction > 0 and d.generate is None:
        cut = max(1, int(len(train) * d.eval_fraction))
        split = train.train_test_split(test_size=cut, seed=cfg.seed,
                                       train_indices_cache_file_name=str(build / "split-train.arrow"),
                                       test_indices_cache_file_name=str(build / "split-eval.arrow"))
        train, ev = split["train"], split["test"]
    return train, ev


def sample_sft_texts(ds, budget: int) -> list[str]:
    """Strings of the formatted rows (prompts, completions, message contents), about `budget` characters,
    taken from rows spread over the dataset."""
    texts: list[str] = []
    used = 0
    step = max(1, len(ds) // 10_000)
    for row in ds.select(range(0, len(ds), step)):
        for value in row.values():
            for text in _strings(value):
                texts.append(text)
                used += len(text)
        if used >= budget:
            break
    return texts


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [str(value["content"])] if isinstance(value.get("content"), str) else []
    return []


@contextlib.contextmanager
def _one_process():
    """TRL wraps its preparation in main-process-first barriers; here exactly one process prepares, so none."""
    from trl.trainer import sft_trainer

    saved = sft_trainer.global_then_local_main_first
    sft_trainer.global_then_local_main_first = contextlib.nullcontext
    try:
        yield
    finally:
        sft_trainer.global_then_local_main_first = saved


def trl_prepare(train, ev, tokenizer, args):
    """TRL's own tokenization/masking/packing of (train, eval), as SFTTrainer.__init__ would run it."""
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    sample = next(iter(train))
    chat_template = None
    if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    me = SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=completion_only,
                         _is_vision_dataset=False, args=args)
    with _one_process():
        train = SFTTrainer._prepare_dataset(me, train, tokenizer, args, args.packing, None, "train")
        if ev is not None:
            packing = args.packing if args.eval_packing is None else args.eval_packing
            ev = SFTTrainer._prepare_dataset(me, ev, tokenizer, args, packing, None, "eval")
    return train, ev


def write_sft(train, ev, tokenizer, args, build: Path) -> dict[str, Any]:
    """Prepare and save both splits into `build`; drop the intermediate Arrow files. Returns the summary."""
    train, ev = trl_prepare(train, ev, tokenizer, args)
    train.save_to_disk(str(build / "train"))
    if ev is not None:
        ev.save_to_disk(str(build / "eval"))
    for p in build.iterdir():
        if p.name not in ("train", "eval"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    splits = {"train": {"rows": len(train)}}
    if ev is not None:
        splits["eval"] = {"rows": len(ev)}
    tokens = _count_tokens(train)
    splits["train"]["tokens"] = tokens
    return {"splits": splits, "max_length": args.max_length, "packing": bool(args.packing)}


def _count_tokens(ds) -> int:
    import pyarrow.compute as pc

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    return int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)


def load_sft(entry: Path):
    from datasets import load_from_disk

    train = load_from_disk(str(entry / "train"))
    ev = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return train, ev
