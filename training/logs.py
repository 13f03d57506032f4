"""Rank-tagged logging with transformers' meaning of log_level, log_level_replica and log_on_each_node.

A process is "main" for logging when it is rank 0, or local rank 0 of its node when log_on_each_node is
true (transformers' `should_log`). Main processes log at `log_level`, the others at `log_level_replica`;
'passive' keeps each library's default: WARNING for the libraries, and for tune-launch's own lines
(progress, metrics, summary) INFO on logging-main processes and WARNING on replicas. Every line carries "[nodeN rankR]"; each node appends to
output_dir/logs/node<N>.log. Python warnings are recorded by logging-main processes only, since every
rank would print the same ones, and each distinct warning once per process. Deprecation and future warnings
of the libraries (Python's, and library log lines announcing one) go to the log file only, never the console.
The libraries' own progress bars (shard writing, dataset maps) are off: tune-launch's step lines, or on a
terminal its one bar (training/console.py), say how far the run is.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tune_launch.training.distributed import RankInfo

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL, "passive": logging.WARNING}
LIBRARY_LOGGERS = ("transformers", "accelerate", "datasets", "trl", "peft", "DeepSpeed", "torch.distributed", "py.warnings")
LOGGER_NAME = "tune_launch"
FORMAT = "%(asctime)s [{tag}] %(levelname)s %(name)s: %(message)s"
DEPRECATION = re.compile(r"deprecat|will be removed|no longer supported", re.I)
PROGRESS_SETTINGS = ("auto", "bar", "lines")


@dataclass(frozen=True)
class LogPlan:
    """What this process does with log records; a pure function of the config and the rank."""

    level: int  # for the libraries
    own_level: int  # for tune-launch's own logger
    is_log_main: bool
    tag: str
    file: Path | None
    bar: bool = False  # rank 0's console is one progress bar (a terminal on stdout), not scrolling step lines


def plan_logging(info: RankInfo, log_level: str, log_level_replica: str, log_on_each_node: bool,
                 output_dir: str | None, progress: str = "lines", stdout_is_terminal: bool = False) -> LogPlan:
    """`progress`: auto (a bar when stdout is a terminal), bar or lines; only rank 0 ever draws a bar."""
    is_log_main = info.is_local_main if log_on_each_node else info.is_main
    name = log_level if is_log_main else log_level_replica
    own = (logging.INFO if is_log_main else logging.WARNING) if name == "passive" else LEVELS[name]
    file = Path(output_dir) / "logs" / f"node{info.node_rank}.log" if output_dir else None
    bar = info.is_main and (progress == "bar" or (progress == "auto" and stdout_is_terminal))
    return LogPlan(level=LEVELS[name], own_level=own, is_log_main=is_log_main, tag=info.tag, file=file, bar=bar)


class _DropReplicaWarnings(logging.Filter):
    """Python warnings are the same on every rank: keep them on logging-main processes only."""

    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        return self.keep or record.name != "py.warnings"


class _RedactSecrets(logging.Filter):
    """Mask anything that looks like a token or key (hf_..., sk-..., AKIA...) before it reaches a log line or file."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tune_launch.redaction import redact

        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _OncePerMessage(logging.Filter):
    """Each distinct Python warning once per process (libraries that set 'always' repeat them every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "tl_warning_key", None) or record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def is_deprecation(record: logging.LogRecord) -> bool:
    """A library's deprecation or future warning: Python's, or a library log line that announces one."""
    if getattr(record, "tl_deprecation", False):
        return True
    return (record.levelno == logging.WARNING and not record.name.startswith(LOGGER_NAME)
            and record.name != "py.warnings" and bool(DEPRECATION.search(record.getMessage())))


class _NotOnConsole(logging.Filter):
    """Deprecations are for the log file: the user can do nothing about a library's FutureWarning mid-run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_deprecation(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning, routed to the 'py.warnings' logger with its category kept for the filters."""
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    deprecation = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
    logging.getLogger("py.warnings").warning(
        "%s", text, extra={"tl_deprecation": deprecation, "tl_warning_key": f"{category.__name__}: {message}"})


def _quiet_library_progress_bars() -> None:
    """Shard-writing and dataset-map bars would scroll through pipes as lines; a user's explicit setting wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _console_handlers(plan: LogPlan) -> list[logging.Handler]:
    """stderr; or, for rank 0 on a terminal, the bar on stdout for INFO and below and stderr for warnings and errors."""
    if not plan.bar:
        return [logging.StreamHandler(sys.stderr)]
    from tune_launch.training import console

    below_warning = console.install(sys.stdout)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.WARNING)
    return [below_warning, errors]


def setup_logging(plan: LogPlan) -> logging.Logger:
    """Install the tagged handlers on our logger and the libraries' loggers (idempotent)."""
    fmt = logging.Formatter(FORMAT.format(tag=plan.tag), datefmt="%H:%M:%S")
    handlers = _console_handlers(plan)
    for h in handlers:
        h.addFilter(_NotOnConsole())
    if plan.file is not None:
        plan.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(plan.file, mode="a", encoding="utf-8"))
    keep_warnings = plan.is_log_main or plan.own_level <= logging.INFO
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_DropReplicaWarnings(keep_warnings))
        h.addFilter(_RedactSecrets())
    _quiet_library_progress_bars()
    warnings.showwarning = _show_warning
    py_warnings = logging.getLogger("py.warnings")
    if not any(isinstance(f, _OncePerMessage) for f in py_warnings.filters):
        py_warnings.addFilter(_OncePerMessage())
    _install_transformers(handlers, plan.level)
    for name in LIBRARY_LOGGERS:
        _attach(logging.getLogger(name), handlers, plan.level)
    _attach(logging.getLogger(LOGGER_NAME), handlers, plan.own_level)
    # bitsandbytes warns at import about optional CPU kernels on every rank; only its errors matter here
    _attach(logging.getLogger("bitsandbytes"), handlers, max(plan.level, logging.ERROR))
    logger = logging.getLogger(LOGGER_NAME)
    logger._tune_launch_plan = plan  # type: ignore[attr-defined]
    return logger


def reattach_library_loggers(logger: logging.Logger) -> None:
    """Libraries imported late (DeepSpeed) add their own handlers: replace them with ours again."""
    plan: LogPlan = logger._tune_launch_plan  # type: ignore[attr-defined]
    for name in LIBRARY_LOGGERS:
        _attach(logging.getLogger(name), list(logger.handlers), plan.level)
    _install_transformers(list(logger.handlers), plan.level)


def _attach(lg: logging.Logger, handlers: list[logging.Handler], level: int) -> None:
    for h in list(lg.handlers):
        lg.removeHandler(h)
    for h in handlers:
        lg.addHandler(h)
    lg.setLevel(level)
    lg.propagate = False


def _install_transformers(handlers: list[logging.Handler], level: int) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.set_verbosity(level)
    hf_logging.disable_progress_bar()  # "Writing model shards" at every save
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()  # our handlers sit on the "transformers" logger itself; no root echo
    _attach(logging.getLogger("transformers"), handlers, level)


def log_traceback(exc: BaseException, message: str) -> str | None:
    """Write `message` and the traceback to this node's log file only (the console gets one line per failed
    rank) and return the file's path; on stderr when no log file is set up, so a traceback is never lost."""
    logger = logging.getLogger(LOGGER_NAME)
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        import traceback

        print(message, file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return None
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, (type(exc), exc, exc.__traceback__))
    for h in files:
        h.handle(record)
        h.flush()
    return files[0].baseFilename


def close_logging(logger: logging.Logger) -> None:
    from tune_launch.training import console

    console.uninstall()
    for h in list(logger.handlers):
        h.flush()
        if isinstance(h, logging.FileHandler):
            h.close()
