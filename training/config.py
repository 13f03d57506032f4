"""The training YAML: one pydantic schema, validated once at the boundary.

No torch import here, so the launcher can validate a YAML in milliseconds before any process starts.
Every section forbids unknown keys; `load_config` turns pydantic's errors into one line that names
the field and, for a misspelt key, the nearest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launch.errors import TuneLaunchError, did_you_mean


class ConfigError(TuneLaunchError):
    """A training YAML that cannot run: names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class LoraConfig(_Section):
    """LoRA adapters through peft (also the adapter half of QLoRA)."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_at_end: bool = False


class QuantizationConfig(_Section):
    """4-bit QLoRA base weights through bitsandbytes."""

    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["bfloat16", "float16", "float32", "uint8"] = "uint8"


class ModelConfig(_Section):
    """Which model: a hub name or local path, or an inline config trained from scratch."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    config_path: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [s for s in ("name_or_path", "config", "config_path") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of model.name_or_path (hub name or local folder), model.config (inline "
                f"config, trained from scratch) or model.config_path (config.json, from scratch); got {sources or 'none'}"
            )
        if self.quantization is not None and self.lora is None:
            raise ValueError("model.quantization (QLoRA) needs model.lora: 4-bit weights cannot be trained directly")
        return self

    @property
    def from_scratch(self) -> bool:
        return self.name_or_path is None


class TokenizerConfig(_Section):
    """A tokenizer by name/path, or one trained locally on the training data (byte-level BPE)."""

    name_or_path: str | None = None
    train_vocab_size: int | None = Field(None, gt=0)
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.name_or_path is None) == (self.train_vocab_size is None):
            raise ValueError("give exactly one of tokenizer.name_or_path or tokenizer.train_vocab_size")
        return self


DataFormat = Literal["text", "alpaca", "chat"]


class DataSource(_Section):
    """One dataset: a local json/jsonl/parquet/txt file or a hub dataset name."""

    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    format: DataFormat = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    max_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of path (local file) or name (hub dataset) for each data source")
        return self


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    num_proc: int | None = Field(None, gt=0)
    generate: dict[str, Any] | None = None  # synthetic data recipe (examples); see training/synthetic.py

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _single_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v


class OptimConfig(_Section):
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)


class TrainConfig(_Section):
    """Steps, batch and precision. `micro_batch_size: auto` lets the memory plan choose."""

    micro_batch_size: int | Literal["auto"] = 8
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_steps: int = Field(-1, ge=-1)
    num_epochs: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    neftune_noise_alpha: float | None = Field(None, gt=0)
    torch_compile: bool | Literal["auto"] = "auto"
    use_liger_kernel: bool | Literal["auto"] = "auto"
    dataloader_num_workers: int = Field(0, ge=0)

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v


class LoggingConfig(_Section):
    """Same meaning as transformers' TrainingArguments fields of these names."""

    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] = "info"
    log_level_replica: Literal["debug", "info", "warning", "error", "critical", "passive"] = "warning"
    log_on_each_node: bool = True
    logging_steps: int = Field(10, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(default_factory=lambda: ["none"])
    run_name: str | None = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _single_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CheckpointConfig(_Section):
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(3, gt=0)
    resume: str = "auto"  # auto | never | a checkpoint folder
    save_final_model: bool = True


class EvalConfig(_Section):
    eval_steps: int | None = Field(None, gt=0)
    eval_at_start: bool = False
    per_device_batch_size: int | None = Field(None, gt=0)


class ConsolidateConfig(_Section):
    """Consolidate sharded checkpoints into HF safetensors at the end of training."""

    enabled: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    merge_lora: bool = False


class TrainingConfig(_Section):
    """The whole training YAML."""

    model: ModelConfig
    tokenizer: TokenizerConfig | None = None
    task: Literal["pretrain", "sft"] = "pretrain"
    data: DataConfig
    max_length: int = Field(2048, gt=0)
    packing: bool = True
    completion_only_loss: bool = True
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig)
    output_dir: str = "outputs/run"
    seed: int = 42

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainingConfig:
        if self.tokenizer is None and self.model.from_scratch:
            raise ValueError("tokenizer: a model trained from scratch needs tokenizer.name_or_path or tokenizer.train_vocab_size")
        if self.task == "pretrain" and any(s.format != "text" for s in self.data.train):
            raise ValueError("data.train.format: task 'pretrain' reads plain text; use format: text or task: sft")
        return self


# --------------------------------------------------------------------------- loading

def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the schema section that `loc` points into (for 'did you mean')."""
    model: Any = TrainingConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _inner_model(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def explain_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first bad field, what is wrong and what to do."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    where = _format_location(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _section_fields(loc)
        hint = did_you_mean(key, valid)
        listing = f"; valid keys here: {', '.join(valid)}" if valid and not hint else ""
        return f"{source}: unknown key '{where}'{hint}{listing}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}'"
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    extra = "" if err.error_count() == 1 else f" [+{err.error_count() - 1} more]"
    return f"{source}: {where}: {msg}{shown}{extra}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.learning_rate=1e-4' -> (['optim', 'learning_rate'], 0.0001); values parse as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value, e.g. optim.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key such as train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings to a raw YAML mapping (a new dict; the input is untouched)."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; every failure is one ConfigError line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file; pass the path of a training YAML (see examples/)")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; pass the path of a training YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read ({e.__class__.__name__}: {e}); check its permissions and encoding") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, ...) at the top, got {type(data).__name__}")
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative local paths in the YAML relative to the YAML's own folder, when that file exists there."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not os.path.isabs(value):
            candidate = base / value
            if candidate.exists():
                return str(candidate.resolve())
        return value

    model = data.get("model")
    if isinstance(model, dict):
        for key in ("name_or_path", "config_path"):
            if key in model:
                model[key] = fix(model[key])
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and "name_or_path" in tok:
        tok["name_or_path"] = fix(tok["name_or_path"])
    dat = data.get("data")
    if isinstance(dat, dict):
        for split in ("train", "eval"):
            sources = dat.get(split)
            for src in [sources] if isinstance(sources, dict) else (sources or []):
                if isinstance(src, dict) and "path" in src:
                    src["path"] = fix(src["path"])
    return data


def validate_config(data: dict[str, Any], source: str = "config") -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain_validation_error(e, source)) from None


def check_local_files(cfg: TrainingConfig, source: str) -> None:
    """Files named in the YAML that look local must exist before any process starts."""
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval or [])):
        for i, src in enumerate(sources):
            if src.path is not None and not Path(src.path).exists():
                raise ConfigError(f"{source}: data.{split}.{i}.path: file '{src.path}' does not exist; fix the path (relative paths are read from the YAML's folder)")
    if cfg.model.config_path is not None and not Path(cfg.model.config_path).exists():
        raise ConfigError(f"{source}: model.config_path: '{cfg.model.config_path}' does not exist")
    name = cfg.model.name_or_path
    if name is not None and _looks_local(name) and not Path(name).exists():
        raise ConfigError(f"{source}: model.name_or_path: local path '{name}' does not exist; give a folder with config.json or a hub name like org/model")


def _looks_local(name: str) -> bool:
    """Hub names are 'model' or 'org/model'; anything else with a path shape is a local folder."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None, check_files: bool = True) -> TrainingConfig:
    """Read, override, resolve relative paths, validate. The only way a YAML enters the program."""
    p = Path(path)
    data = read_yaml(p)
    data = apply_overrides(data, overrides or [])
    data = resolve_paths(data, p.resolve().parent)
    cfg = validate_config(data, str(p))
    if check_files:
        check_local_files(cfg, str(p))
    return cfg
