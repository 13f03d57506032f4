"""A disk cache for what the launcher learns from a model config with transformers: that it builds, and its facts.

Building a 1B model on the meta device costs the torch and transformers imports plus the build (~3 s on a
2-core machine) for answers that only change with the config itself. Entries are keyed by the config's
content (the inline dict, or the bytes of config.json: local, or already in the Hugging Face hub cache), the
transformers version and, for facts, the LoRA settings. Configs with `trust_remote_code` are never cached (their
code can change under the same config). The cache is an optimisation only: an unreadable or stale entry is
recomputed, a failed write is ignored, and every write is atomic (temporary file + rename).

Location: $TUNE_LAUNCH_CACHE_DIR, else $XDG_CACHE_HOME/tune-launch, else ~/.cache/tune-launch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CACHE_ENV = "TUNE_LAUNCH_CACHE_DIR"
FORMAT = 1  # bump when what an entry means changes (e.g. a new ModelFacts field)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tune-launch"


def _transformers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def config_file(model: Any) -> Path | None:
    """The config.json a model config is read from, without importing transformers (None: not known locally)."""
    target = model.config_path or model.name_or_path
    path = Path(str(target)).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    if model.config_path is not None or path.exists():
        return None
    try:  # a hub name: the file transformers would read, if it is already in the hub cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(target), "config.json")
    except Exception:  # noqa: BLE001 - an odd repo name or an old huggingface_hub: just no cache
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def config_key(model: Any) -> str | None:
    """The cache key of a training `ModelConfig`'s transformers config; None when it must not be cached."""
    if model.trust_remote_code:
        return None
    if model.config is not None:
        content = json.dumps(model.config, sort_keys=True, default=str).encode()
    else:
        path = config_file(model)
        if path is None:
            return None
        try:
            content = path.read_bytes()
        except OSError:
            return None
    h = hashlib.sha256()
    for part in (f"format {FORMAT}", f"transformers {_transformers_version()}", "inline" if model.config is not None else "file"):
        h.update(part.encode() + b"\0")
    h.update(content)
    return h.hexdigest()[:32]


def facts_key(model: Any) -> str | None:
    """The config key refined by the LoRA settings (they change the adapter parameter count)."""
    base = config_key(model)
    if base is None:
        return None
    lora = json.dumps(model.lora.model_dump() if model.lora is not None else None, sort_keys=True)
    return hashlib.sha256(f"{base}\0{lora}".encode()).hexdigest()[:32]


def read(kind: str, key: str | None, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    if key is None:
        return None
    try:
        data = json.loads((cache_dir(env) / kind / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write(kind: str, key: str | None, data: dict[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Atomic: a reader sees the old entry or the new one, never half of one. Failures are ignored."""
    if key is None:
        return
    folder = cache_dir(env) / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({**data, "format": FORMAT}, fh, sort_keys=True)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, UnboundLocalError):
            pass
