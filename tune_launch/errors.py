"""The one error type users see: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ESCAPE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in _LINE_BREAKS}


def one_line(text: str) -> str:
    """Escape every character str.splitlines() breaks on, so user text echoed in a message keeps it one line."""
    return text.translate(_ESCAPE_BREAKS)


class TuneLaunchError(Exception):
    """A user-facing error: a clear sentence naming the field or file and what to do (always one line)."""

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


def nearest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close valid name exists, else ''."""
    valid = list(valid)
    guess = nearest(name, valid)
    return f' (did you mean "{guess}"?)' if guess else ""
