"""Reading a training YAML: file, `key.sub=value` overrides, relative paths, validation against the schema.

Validated once at the boundary (`load_config`); pydantic's errors become one line that names the field and,
for a misspelt key, the nearest valid one. The sections themselves are in `training/schema.py`. No torch import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tune_launch.errors import TuneLaunchError, did_you_mean
from tune_launch.training.schema import TrainingConfig


class ConfigError(TuneLaunchError):
    """A training YAML that cannot run: names the field and the fix."""


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
    prefix = f"{source}: {where}: " if loc else f"{source}: "
    return f"{prefix}{msg}{shown}{extra}"


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
            for src in [sources] if isinstance(sources, dict) else (sources if isinstance(sources, list) else []):
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
    for split, sources in (("train", cfg.data.train or []), ("eval", cfg.data.eval or [])):
        for i, src in enumerate(sources):
            if src.path is not None and not Path(src.path).exists():
                raise ConfigError(f"{source}: data.{split}.{i}.path: file '{src.path}' does not exist; fix the path (relative paths are read from the YAML's folder)")
    if cfg.model.config_path is not None and not Path(cfg.model.config_path).exists():
        raise ConfigError(f"{source}: model.config_path: '{cfg.model.config_path}' does not exist")
    name = cfg.model.name_or_path
    if name is not None and _looks_local(name) and not Path(name).exists():
        raise ConfigError(f"{source}: model.name_or_path: local path '{name}' does not exist; give a folder with config.json or a hub name like org/model")


def check_device(cfg: TrainingConfig, device: str, source: str = "config") -> None:
    """Options the chosen device cannot run; the launcher calls this before any process starts."""
    if device != "cpu":
        return
    if cfg.model.quantization is not None and cfg.model.quantization.bits == 4:  # bitsandbytes' int8 runs on CPU
        raise ConfigError(f"{source}: model.quantization: QLoRA (4-bit bitsandbytes) trains only on a CUDA GPU; "
                          "drop model.quantization for a LoRA rehearsal on CPU (or use load_in_8bit: true)")
    if cfg.train.precision == "fp16":
        raise ConfigError(f"{source}: train.precision: fp16 mixed precision needs a GPU; use auto, fp32 or bf16 on CPU")
    if cfg.train.use_liger_kernel is True:
        raise ConfigError(f"{source}: train.use_liger_kernel: Liger kernels need a GPU; use auto or false on CPU")


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
