"""Which filesystem holds a path, and whether every node of a job sees the same files there.

Shared by the launcher's preflight (checkpoints written by several nodes into one output_dir) and the rank
side (one data preparer per job when the cache is shared, one per node when it is node-local).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

SHARED_FS_ENV = "TUNE_LAUNCH_SHARED_FS"  # "1": trust that a folder is shared even if its type looks local
LOCAL_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat",
                            "exfat", "ramfs", "devtmpfs", "squashfs"})


def filesystem_type(path: Path, mounts_text: str | None = None) -> str | None:
    """Type of the filesystem holding `path`, from the longest matching mount point in /proc/mounts."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    target = str(path)
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/") or mount == "/") and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor (what a not-yet-created folder will live on)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def looks_shared(path: Path, env: Mapping[str, str], mounts_text: str | None = None) -> bool:
    """True when `path` is on a network/cluster filesystem (NFS, Lustre, GPFS, ...) or the user says it is shared."""
    if env.get(SHARED_FS_ENV) == "1":
        return True
    kind = filesystem_type(nearest_existing(path), mounts_text)
    return kind is not None and kind.lower() not in LOCAL_FS_TYPES
