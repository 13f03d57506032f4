"""Durability helpers shared by the checkpoint writer (training) and consolidation: one place that knows
that a rename is only durable once the directory holding it is fsynced."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
