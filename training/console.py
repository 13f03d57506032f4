"""The main process's console on a terminal: one progress bar at the bottom, the other lines printed above it.

Only rank 0 with a terminal on stdout gets a bar (its stderr goes through the launcher's supervisor, a pipe;
stdout is the user's terminal itself). Its INFO lines then go to stdout through `BarHandler`: a step line moves
the bar and becomes its text, any other line is printed above the bar. Warnings and errors stay on stderr, where
the supervisor reads them. Everything still goes to the node's log file as lines. Elsewhere (files, pipes,
other ranks) nothing here is active and the functions are no-ops.
"""

from __future__ import annotations

import logging
import re
from typing import TextIO

_HEAD = re.compile(r"^step \d+/\d+\s*")
_bar: TerminalBar | None = None


class TerminalBar:
    """A tqdm bar over the optimizer steps, its text the latest step line's fields."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._tqdm = None

    def start(self, step: int, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self._tqdm = tqdm(total=total or None, initial=step, file=self.stream, dynamic_ncols=True, mininterval=0.2,
                          leave=True, bar_format="step {n_fmt}/{total_fmt} |{bar:24}| {desc}")

    def advance(self, step: int, total: int) -> None:
        t = self._tqdm
        if t is None:
            return
        if total and t.total != total:
            t.total = total
        if step > t.n:
            t.update(step - t.n)

    def show_step(self, line: str) -> None:
        if self._tqdm is None:
            self.write(line)
            return
        self._tqdm.set_description_str(_HEAD.sub("", line), refresh=True)

    def write(self, text: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


class BarHandler(logging.Handler):
    """Console handler for rank 0 on a terminal (records below WARNING; higher ones keep stderr)."""

    def __init__(self, bar: TerminalBar) -> None:
        super().__init__(level=logging.NOTSET)
        self.bar = bar
        self.addFilter(lambda record: record.levelno < logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if getattr(record, "tl_progress", None) == "step":
                self.bar.show_step(record.getMessage())
            else:
                self.bar.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)


def install(stream: TextIO) -> BarHandler:
    """Make this process's console a bar on `stream` (a terminal); returns the handler to attach."""
    global _bar
    _bar = TerminalBar(stream)
    return BarHandler(_bar)


def uninstall() -> None:
    global _bar
    if _bar is not None:
        _bar.close()
    _bar = None


def start_bar(step: int, total: int) -> None:
    if _bar is not None:
        _bar.start(step, total)


def advance(step: int, total: int) -> None:
    if _bar is not None:
        _bar.advance(step, total)


def close_bar() -> None:
    if _bar is not None:
        _bar.close()
