"""A DeepSpeed op build that was killed midway leaves its lock file in the torch extensions folder, and every later
build of that op waits on it forever (torch's FileBaton polls the file; nothing owns it). Found before launch, in
one line naming the file, instead of an hour later by the hang detection (`watchdog.model_load_s`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

STALE_AFTER_S = 900  # a CPU build of DeepSpeed's ops takes ~2 min here; a lock this old has no build behind it


def extensions_root(env: Mapping[str, str]) -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions (torch's default)."""
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    return Path(env.get("HOME") or Path.home()) / ".cache" / "torch_extensions"


def stale_build_locks(env: Mapping[str, str], now: float | None = None, older_than_s: float = STALE_AFTER_S) -> tuple[str, ...]:
    """Lock files of extension builds older than `older_than_s` (the probe: reads the folder only)."""
    root = extensions_root(env)
    now = time.time() if now is None else now
    found = []
    for pattern in ("*/lock", "*/*/lock"):  # <root>/<op>/lock with TORCH_EXTENSIONS_DIR, else <root>/<py_tag>/<op>/lock
        for lock in root.glob(pattern):
            try:
                if now - lock.stat().st_mtime > older_than_s:
                    found.append(str(lock))
            except OSError:
                continue
    return tuple(sorted(set(found)))


def stale_lock_finding(locks: tuple[str, ...] | None, uses_deepspeed: bool) -> tuple[str, str] | None:
    """(message, fix) for the preflight, or None. Pure."""
    if not locks or not uses_deepspeed:
        return None
    age = f"older than {STALE_AFTER_S // 60} minutes"
    return (f"{locks[0]}{f' (and {len(locks) - 1} more)' if len(locks) > 1 else ''}: a DeepSpeed op build lock {age}, "
            "left by a build that was killed; every rank would wait on it forever",
            f"if no build is running on this machine, delete it (rm {' '.join(locks)})")

