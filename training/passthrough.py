"""`trainer:` in the YAML: extra TrainingArguments / SFTConfig fields, checked before launch against the installed
transformers and TRL dataclasses.

A name the dataclass does not have gets the nearest valid one (and, for fields transformers or TRL renamed, the new
name); a field the schema already owns names the YAML key to use; a field tune-launch must control (output_dir,
deepspeed, fsdp, ...) says what sets it; a value of the wrong type or outside the field's choices is refused. The
field table is read from the dataclasses once per installed version and cached as JSON (importing transformers
costs seconds; the launcher loads the YAML before anything else), and only when `trainer:` is not empty.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from tune_launch.errors import did_you_mean

# Dataclass field -> the YAML key that sets it (training/trainer.py `arguments()` maps them).
OWNED = {
    "per_device_train_batch_size": "train.micro_batch_size", "per_device_eval_batch_size": "eval.per_device_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "max_steps": "train.max_steps",
    "num_train_epochs": "train.num_epochs", "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.adam_beta1", "adam_beta2": "optim.adam_beta2", "max_grad_norm": "optim.max_grad_norm",
    "optim": "optim.optimizer", "lr_scheduler_type": "optim.scheduler", "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio", "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "train.gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs": "train.gradient_checkpointing_kwargs", "torch_compile": "train.torch_compile",
    "use_liger_kernel": "train.use_liger_kernel", "liger_kernel_config": "train.use_liger_kernel",
    "neftune_noise_alpha": "train.neftune_noise_alpha", "dataloader_num_workers": "train.dataloader_num_workers",
    "ddp_timeout": "train.ddp_timeout", "bf16": "train.precision", "fp16": "train.precision",
    "log_level": "logging.log_level", "log_level_replica": "logging.log_level_replica",
    "log_on_each_node": "logging.log_on_each_node", "logging_steps": "logging.logging_steps",
    "report_to": "logging.report_to", "run_name": "logging.run_name", "eval_strategy": "eval.eval_strategy",
    "eval_steps": "eval.eval_steps", "eval_on_start": "eval.eval_at_start", "save_strategy": "checkpoint.save_strategy",
    "save_steps": "checkpoint.save_steps", "save_total_limit": "checkpoint.save_total_limit",
    "load_best_model_at_end": "eval.load_best_model_at_end", "metric_for_best_model": "eval.metric_for_best_model",
    "greater_is_better": "eval.greater_is_better", "resume_from_checkpoint": "checkpoint.resume", "seed": "seed",
    "data_seed": "seed", "output_dir": "output_dir", "max_length": "max_length", "packing": "packing",
    "completion_only_loss": "completion_only_loss", "dataset_text_field": "data.train[].text_field",
    "dataset_num_proc": "data.num_proc", "push_to_hub": "hub", "hub_model_id": "hub.model_id",
    "hub_strategy": "hub.strategy", "hub_private_repo": "hub.private",
}
# Fields tune-launch sets itself, and what the user changes instead.
CONTROLLED = {
    "deepspeed": "the profile (--profile zero2/zero3/...)", "fsdp": "the profile (--profile fsdp)",
    "fsdp_config": "the profile (--profile fsdp)", "accelerator_config": "the profile and the launcher",
    "ddp_backend": "the launcher (gloo on CPU, nccl on GPUs)", "use_cpu": "the launcher (--cpu)",
    "local_rank": "the launcher", "save_on_each_node": "the launcher (atomic checkpoints on a shared output_dir)",
    "save_only_model": "tune-launch: checkpoints keep the optimizer so resume is exact",
    "logging_dir": "tune-launch (output_dir/runs)", "include_num_input_tokens_seen": "tune-launch (the run report)",
    "remove_unused_columns": "tune-launch (the data path)", "hub_token": "HF_TOKEN in the environment, never the YAML",
    "disable_tqdm": "tune-launch (a bar on a terminal, lines in logs)",
    "restore_callback_states_from_checkpoint": "tune-launch (early stopping continues its count after a resume)",
}
# Names from older tutorials that transformers 5 / TRL 1 renamed or removed.
RENAMED = {
    "evaluation_strategy": "eval.eval_strategy", "max_seq_length": "max_length",
    "group_by_length": "trainer.train_sampling_strategy: group_by_length",
    "overwrite_output_dir": "checkpoint.resume: never (tune-launch resumes from output_dir by default)",
    "no_cuda": "--cpu", "fp16_full_eval": "train.precision", "hub_private": "hub.private",
}
KIND_WORDS = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string", "list": "a list",
              "dict": "a mapping", "none": "null"}


def check_trainer_fields(fields: dict[str, Any], task: str) -> None:
    """Raise ValueError, one line, for the first entry of `trainer:` that cannot be passed through."""
    cls = "SFTConfig" if task == "sft" else "TrainingArguments"
    table = field_table(cls)
    for name, value in fields.items():
        name = str(name)
        if name in OWNED:
            raise ValueError(f"trainer.{name}: the YAML sets it with {OWNED[name]}; use that key instead")
        if name in CONTROLLED:
            raise ValueError(f"trainer.{name}: set by {CONTROLLED[name]}, not passed through")
        if name not in table:
            if name in RENAMED:
                raise ValueError(f"trainer.{name}: not a field of {_versions(cls)} {cls} (renamed or removed); "
                                 f"use {RENAMED[name]}")
            if task != "sft" and name in field_table("SFTConfig"):
                raise ValueError(f"trainer.{name}: an SFTConfig field; task pretrain builds TrainingArguments (use task: sft)")
            raise ValueError(f"trainer.{name}: not a field of {_versions(cls)} {cls}{did_you_mean(name, table)}")
        problem = value_problem(table[name], value)
        if problem:
            raise ValueError(f"trainer.{name}: {problem} (got {value!r})")


def value_problem(spec: dict[str, Any], value: Any) -> str | None:
    """Why `value` does not fit a field spec ({"kinds": [...], "choices": [...]}), or None."""
    kinds, choices = set(spec.get("kinds", ["any"])), spec.get("choices")
    if "any" in kinds:
        return None
    got = _kind(value)
    ok = got in kinds or (got == "int" and "float" in kinds)
    if not ok:
        return "expects " + " or ".join(KIND_WORDS.get(k, k) for k in sorted(kinds))
    if choices and got == "str" and value not in choices:
        return f"expects one of {', '.join(map(str, choices))}{did_you_mean(value, map(str, choices))}"
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "none"
    for kind, tp in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list), ("dict", dict)):
        if isinstance(value, tp):
            return kind
    return "any"


# --------------------------------------------------------------------------- the field table (cached per version)

def _versions(cls: str) -> str:
    tf = _version("transformers")
    return f"transformers {tf}" if cls == "TrainingArguments" else f"TRL {_version('trl')}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def _cache_path(cls: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tune-launch"
    return root / f"fields-{cls}-transformers{_version('transformers')}-trl{_version('trl')}.json"


def field_table(cls: str) -> dict[str, dict[str, Any]]:
    """{field: {"kinds": [...], "choices": [...]}} of TrainingArguments or SFTConfig, from the cache when it exists."""
    return dict(_field_table(cls))


_MEMO: dict[str, dict[str, Any]] = {}  # per process


def _field_table(cls: str) -> dict[str, Any]:
    if cls in _MEMO:
        return _MEMO[cls]
    path = _cache_path(cls)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = _read_dataclass(cls)
        _write_atomically(path, json.dumps(table, sort_keys=True))
    _MEMO[cls] = table
    return table


def _read_dataclass(cls: str) -> dict[str, Any]:
    if cls == "SFTConfig":
        from trl import SFTConfig as klass
    else:
        from transformers import TrainingArguments as klass
    hints = typing.get_type_hints(klass)
    table = {}
    for f in dataclasses.fields(klass):
        if not f.init:
            continue
        spec = type_spec(hints.get(f.name, f.type))
        meta_choices = (f.metadata or {}).get("choices")
        if meta_choices and not spec.get("choices"):
            spec["choices"] = [str(c) for c in meta_choices]
        table[f.name] = spec
    return table


def type_spec(tp: Any) -> dict[str, Any]:
    """The YAML value kinds a dataclass annotation accepts, and the string choices of an Enum or Literal."""
    kinds: set[str] = set()
    choices: list[str] = []
    for arg in _union_args(tp):
        origin = typing.get_origin(arg) or arg
        if arg is type(None):
            kinds.add("none")
        elif origin is typing.Literal:
            choices += [str(v) for v in typing.get_args(arg)]
            kinds.add("str")
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            choices += [str(m.value) for m in origin]
            kinds.add("str")
        elif origin in (bool, int, float, str, list, dict):
            kinds.add(origin.__name__)
        elif origin in (tuple, set, frozenset):
            kinds.add("list")
        else:
            kinds.add("any")
    spec: dict[str, Any] = {"kinds": sorted(kinds) or ["any"]}
    if choices and "str" in kinds and not ({"any"} & kinds):
        spec["choices"] = sorted(set(choices))
    return spec


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _write_atomically(path: Path, text: str) -> None:
    """Best effort: a cache that cannot be written is recomputed next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass
