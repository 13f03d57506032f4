"""Prompt templates for instruction rows: `data.train[].template` over the row's own fields.

The template is the prompt; the completion is the row's `completion_field` (default `output`), so the loss stays
on the completion only, as with the built-in alpaca prompt. Two spellings:
- a Python format string: `"### Instrucción:\\n{instruction}\\n\\n### Entrada:\\n{input}\\n\\n### Respuesta:\\n"`;
- Jinja text (any template with `{{`, `{%` or `{#`), rendered in a sandbox: `{% if input %}...{% endif %}`.
A JSON null renders as an empty string. A field the template needs that a row lacks stops the run with one line
naming the file, the row and the field. No torch import: the schema checks templates before launch.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from typing import Any, Literal

JINJA_MARKS = ("{{", "{%", "{#")


class TemplateError(ValueError):
    """A template that cannot be parsed, or that names the completion."""


@dataclass(frozen=True)
class Template:
    text: str
    engine: Literal["format", "jinja"]
    fields: tuple[str, ...]  # the row fields the template reads (for Jinja: every name it uses)


@functools.lru_cache(maxsize=64)
def parse_template(text: str) -> Template:
    """Which engine, which fields; raises TemplateError naming what is wrong."""
    if any(mark in text for mark in JINJA_MARKS):
        return Template(text, "jinja", _jinja_fields(text))
    return Template(text, "format", _format_fields(text))


def _format_fields(text: str) -> tuple[str, ...]:
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise TemplateError(f"not a valid format string ({e}); write fields as {{instruction}}, or use Jinja") from None
    for _literal, name, _spec, _conversion in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise TemplateError(f"'{{{name}}}' is positional; name the row's field, e.g. {{instruction}}")
        if root not in fields:
            fields.append(root)
    return tuple(fields)


def _jinja_env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def _jinja_fields(text: str) -> tuple[str, ...]:
    from jinja2 import TemplateSyntaxError, meta

    try:
        ast = _jinja_env().parse(text)
    except TemplateSyntaxError as e:
        raise TemplateError(f"Jinja syntax error at line {e.lineno}: {e.message}") from None
    return tuple(sorted(meta.find_undeclared_variables(ast)))


@functools.lru_cache(maxsize=64)
def _compiled_jinja(text: str):
    return _jinja_env().from_string(text)


def check_source_template(src: Any) -> None:
    """The schema's rule for one data source (raises ValueError, reported as `data.train.N: ...`)."""
    if src.template is None:
        if "completion_field" in src.model_fields_set:
            raise ValueError("completion_field: goes with template (the built-in alpaca prompt completes with 'output')")
        return
    if src.format != "alpaca":
        raise ValueError(f"template: renders instruction rows into a prompt; use format: alpaca (format {src.format} "
                         "rows are " + ("rendered with the tokenizer's chat template)" if src.format == "chat" else "used as they are)"))
    try:
        template = parse_template(src.template)
    except TemplateError as e:
        raise ValueError(f"template: {e}") from None
    if src.completion_field in template.fields:
        raise ValueError(f"template: names the completion field '{src.completion_field}'; the template is the prompt "
                         f"and the completion follows it, so drop '{src.completion_field}' from the template")


def render_prompt(template: Template, row: dict[str, Any]) -> str:
    """The prompt for one row; KeyError(field) when the row lacks a field the template needs."""
    values = {k: ("" if v is None else v) for k, v in row.items()}
    if template.engine == "format":
        missing = [f for f in template.fields if f not in values]
        if missing:
            raise KeyError(missing[0])
        return template.text.format_map(values)
    from jinja2 import UndefinedError

    try:
        return _compiled_jinja(template.text).render(**values)
    except UndefinedError as e:
        m = re.search(r"'([^']+)' is undefined", str(e))
        raise KeyError(m.group(1) if m else str(e)) from None


def prompt_completion(row: dict[str, Any], src: Any, index: int | None = None) -> dict[str, str]:
    """One row in TRL's prompt/completion shape, or one line naming the file, row and missing field."""
    from tune_launch.training.config import ConfigError

    template = parse_template(src.template)
    try:
        prompt = render_prompt(template, row)
        completion = row[src.completion_field]
    except KeyError as e:
        field = str(e.args[0]) if e.args else "?"
        raise ConfigError(missing_field_message(src, row, field, index)) from None
    return {"prompt": prompt, "completion": "" if completion is None else str(completion)}


def missing_field_message(src: Any, row: dict[str, Any], field: str, index: int | None) -> str:
    from tune_launch.errors import did_you_mean

    where = src.path or src.name or "data"
    at = f"row {index}" if index is not None else "a row"
    role = "completion_field" if field == src.completion_field else "template"
    have = ", ".join(sorted(map(str, row))) or "no fields"
    return (f"data: {where} {at}: the {role} needs field '{field}', which the row lacks"
            f"{did_you_mean(field, [str(k) for k in row])} (its fields: {have}); fix the data or the {role}")
