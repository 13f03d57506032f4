"""The prepared-data cache: where it lives, what names an entry, and how an entry is written and trusted.

An entry is a pure function of its key: the sources' identity (path, size, modification time; hub name and
fingerprint), the tokenizer's identity (a hash of its vocabulary, merges, special tokens and template), the
format, max_length, packing, seed, eval split settings and PREP_VERSION. It is built in a private folder next
to its final place, every file's size and xxh3 checksum go into manifest.json, and one rename publishes it, so a
reader sees a complete entry or none. An entry whose files do not match their manifest is corrupt: it is moved
aside and rebuilt, never trained on.

No torch or transformers import: the launcher's preflight asks this module whether a YAML's data is prepared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from tune_launch.durable import fsync_dir

log = logging.getLogger("tune_launch")
PREP_VERSION = 1  # bump when the files an entry holds, or how they are computed, change
MANIFEST = "manifest.json"
INDEX = "index"  # cheap config hash -> entry key, for the preflight's "already prepared?" question
CHUNK = 8 * 1024 * 1024


def default_cache_root(env: Mapping[str, str]) -> Path:
    """The Hugging Face datasets cache (HF_DATASETS_CACHE, else HF_HOME/datasets, else ~/.cache/...), tune-launch/."""
    if env.get("HF_DATASETS_CACHE"):
        base = Path(env["HF_DATASETS_CACHE"])
    elif env.get("HF_HOME"):
        base = Path(env["HF_HOME"]) / "datasets"
    else:
        base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "datasets"
    return base.expanduser() / "tune-launch"


def cache_root(cache_dir: str | None, env: Mapping[str, str]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_root(env)


def digest(parts: Any) -> str:
    """A stable hex name for any JSON-able description (sorted keys)."""
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())[:24]


def file_identity(path: Path) -> dict[str, Any]:
    """What says a local file is unchanged without reading it: resolved path, size, modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- writing an entry

class ChecksumWriter:
    """A binary file written in pieces, hashed as it goes (no second read to checksum it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._hash = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"size": self.size, "xxh3": self._hash.hexdigest()}


def checksum_file(path: Path) -> dict[str, Any]:
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"size": size, "xxh3": h.hexdigest()}


def new_build_dir(root: Path, key: str) -> Path:
    """A private folder beside the entry's final place (same filesystem, so publishing is one rename)."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root, key)
    build = root / f".build-{key}-{socket.gethostname()}-{os.getpid()}"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    return build


def publish(build: Path, final: Path, key: str, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> Path:
    """Write the manifest (sizes, checksums, summary), then rename the build folder into place. When another
    preparer (another node on the same disk) published first, keep theirs: same key, same content."""
    extra = {str(p.relative_to(build)): checksum_file(p) for p in sorted(build.rglob("*"))
             if p.is_file() and str(p.relative_to(build)) not in files}
    manifest = {"version": PREP_VERSION, "key": key, "files": {**files, **extra}, "info": info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = build / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, build / MANIFEST)
    fsync_dir(build)
    try:
        os.rename(build, final)
    except OSError:
        if verify(final) is None:
            shutil.rmtree(build, ignore_errors=True)
            return final
        discard(final, "corrupt")
        os.rename(build, final)
    fsync_dir(final.parent)
    return final


# --------------------------------------------------------------------------- trusting an entry

@dataclass(frozen=True)
class Entry:
    path: Path
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify(folder: Path, checksums: bool = True) -> str | None:
    """None when every file matches the manifest, else what is wrong (one phrase naming the file)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST}"
    if manifest.get("version") != PREP_VERSION:
        return f"written by preparation format {manifest.get('version')}, this is {PREP_VERSION}"
    for rel, want in manifest["files"].items():
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"missing file {rel}"
        if size != want["size"]:
            return f"file {rel} has {size} bytes, the manifest says {want['size']}"
    if checksums:
        for rel, want in manifest["files"].items():
            got = checksum_file(folder / rel)["xxh3"]
            if got != want["xxh3"]:
                return f"file {rel} fails its checksum ({got} != {want['xxh3']})"
    return None


def open_entry(folder: Path) -> Entry | None:
    """The entry if its manifest is readable (sizes are checked by the caller that verifies)."""
    manifest = read_manifest(folder)
    return Entry(folder, manifest) if manifest is not None else None


def discard(folder: Path, why: str) -> None:
    """Move a bad entry aside (one rename, so no reader sees it half deleted), then delete it."""
    aside = folder.with_name(f".{why}-{folder.name}-{os.getpid()}-{int(time.time())}")
    try:
        os.rename(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_dead_builds(root: Path, key: str) -> None:
    """Build folders for this key left by a preparer that died (same host, pid gone)."""
    host = socket.gethostname()
    for p in root.glob(f".build-{key}-*"):
        owner = p.name[len(f".build-{key}-"):]
        h, _, pid = owner.rpartition("-")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the preflight's index

def record_index(root: Path, config_key: str, entry: Path) -> None:
    """Remember which entry this YAML's data became (atomic, best effort: only the preflight reads it)."""
    try:
        (root / INDEX).mkdir(parents=True, exist_ok=True)
        tmp = root / INDEX / f".{config_key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"entry": entry.name}))
        os.replace(tmp, root / INDEX / f"{config_key}.json")
    except OSError:
        pass


def indexed_entry(root: Path, config_key: str) -> Path | None:
    """The published entry the index names for this config key, when its manifest is still there."""
    try:
        name = json.loads((root / INDEX / f"{config_key}.json").read_text())["entry"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = root / str(name)
    return folder if read_manifest(folder) is not None else None
