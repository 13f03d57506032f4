"""The one error type users see: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TuneLaunchError(Exception):
    """A user-facing error: a clear sentence naming the field or file and what to do."""

    exit_code = 2


def nearest(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close valid name exists, else ''."""
    valid = list(valid)
    guess = nearest(name, valid)
    return f' (did you mean "{guess}"?)' if guess else ""
