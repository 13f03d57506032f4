"""One data preparer per job; the other ranks wait for its signal file, not in a collective.

Global rank 0 prepares when the cache is on a filesystem every node shares (NFS, Lustre, GPFS, ... or
TUNE_LAUNCH_SHARED_FS=1), else local rank 0 of each node prepares into its node's cache. The others poll for
the preparer's signal file with their own time limit (`data.prepare_timeout`), so a tokenization of hours never
trips the NCCL/gloo watchdog (`train.ddp_timeout` only bounds training collectives), a preparer that fails
hands its one-line reason to every waiting rank at once, and a stuck one is named when the limit runs out.

The signal is per job: rank 0 draws a random token and broadcasts it once at start-up (all ranks reach that
broadcast within seconds of each other), so a signal left by an earlier job is never mistaken for this one's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_launch import heartbeat
from tune_launch.errors import TuneLaunchError
from tune_launch.training.distributed import RankInfo
from tune_launch.training.prepare import PreparedData, prepare_data
from tune_launch.training.sources import DataError

log = logging.getLogger("tune_launch")
SIGNALS = ".signals"
STALE_SIGNAL_S = 3 * 24 * 3600


@dataclass(frozen=True)
class Role:
    prepares: bool
    preparer: str  # who prepares, for the waiting ranks' messages
    scope: str  # "job" (one preparer) or "node<N>" (one per node)
    preparer_rank: int = 0  # its global rank: the waiting ranks follow its heartbeat


def choose_role(info: RankInfo, shared_cache: bool) -> Role:
    """Pure: who prepares, given where the cache is."""
    if shared_cache or info.num_nodes <= 1:
        return Role(info.rank == 0, "rank 0 (node 0)", "job", 0)
    return Role(info.local_rank == 0, f"local rank 0 of node {info.node_rank}", f"node{info.node_rank}",
                info.rank - info.local_rank)


def job_token(info: RankInfo) -> str:
    """A token every rank of this job agrees on (rank 0's, broadcast once)."""
    token = uuid.uuid4().hex
    if info.world_size <= 1:
        return token
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
    box = [token]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def signal_path(root: Path, token: str, scope: str) -> Path:
    return root / SIGNALS / f"{token}-{scope}.json"


def write_signal(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    os.replace(tmp, path)
    _remove_stale(path.parent)


def _remove_stale(folder: Path) -> None:
    now = time.time()
    for p in folder.glob("*.json"):
        try:
            if now - p.stat().st_mtime > STALE_SIGNAL_S:
                p.unlink()
        except OSError:
            pass


class PreparerFollower:
    """A waiting rank's heartbeat moves only when the preparer's does: another node's launcher, which watches
    only its own ranks, then sees progress while rank 0 tokenizes for hours, and none once the preparer is stuck."""

    def __init__(self, heartbeat_file: Path | None) -> None:
        self.path, self.seen = heartbeat_file, None

    def poll(self) -> None:
        if self.path is None:
            return
        beat = heartbeat.read(self.path)
        if beat is None or beat.phase != "data" or beat.progress == self.seen:
            return
        self.seen = beat.progress
        heartbeat.report_progress("data", beat.done, beat.total or None,
                                  detail=f"waiting for rank {beat.rank}: {beat.detail}".strip())


def wait_for_signal(path: Path, timeout: float, preparer: str, poll: float = 0.5,
                    report_every: float = 60.0, follower: PreparerFollower | None = None) -> dict[str, Any]:
    """The preparer's signal, or a DataError naming it once `timeout` seconds have passed."""
    t0 = time.monotonic()
    next_report = report_every
    follower = follower or PreparerFollower(None)
    while True:
        follower.poll()
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        waited = time.monotonic() - t0
        if waited >= timeout:
            raise DataError(f"data: waited {waited:.0f} s for {preparer} to prepare the data (data.prepare_timeout "
                            f"{timeout:.0f} s) and it never signalled {path.name}; see that rank's log, raise "
                            "data.prepare_timeout, or run `tune-launch prepare` before the job")
        if waited >= next_report:
            log.info("data: still waiting for %s to prepare the data (%.0f s of data.prepare_timeout %.0f s)",
                     preparer, waited, timeout)
            next_report += report_every
        time.sleep(poll)


@contextmanager
def tokenizer_threads() -> Iterator[None]:
    """The launcher turns the fast tokenizer's threads off in every rank (TOKENIZERS_PARALLELISM=false: ranks must
    not oversubscribe the cores while training); the one preparing rank may use them all while its peers wait.
    Set back afterwards, so a later fork (dataloader workers) neither deadlocks nor warns."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def prepared_for_run(cfg, info: RankInfo, env: Mapping[str, str] | None = None, sft_args=None) -> PreparedData:
    """This rank's view of the prepared data: prepared here, or by the rank `choose_role` names."""
    from tune_launch.filesystems import looks_shared
    from tune_launch.training.datacache import cache_root

    env = os.environ if env is None else env
    if info.world_size <= 1:
        with tokenizer_threads():
            return prepare_data(cfg, env, sft_args)
    root = cache_root(cfg.data.cache_dir, env)
    role = choose_role(info, looks_shared(root, env))
    signal = signal_path(root, job_token(info), role.scope)
    if role.prepares:
        return _prepare_and_signal(cfg, env, sft_args, signal)
    log.info("data: %s prepares the data (cache %s); waiting up to data.prepare_timeout %d s", role.preparer, root,
             cfg.data.prepare_timeout)
    t0 = time.monotonic()
    follower = PreparerFollower(heartbeat.rank_file(cfg.output_dir, role.preparer_rank))
    payload = wait_for_signal(signal, cfg.data.prepare_timeout, role.preparer, follower=follower)
    if payload.get("status") != "ready":
        raise DataError(f"data: {role.preparer} could not prepare the data: {payload.get('message', 'no reason given')}")
    log.info("data: ready after %.1f s: %s", time.monotonic() - t0, payload["entry"])
    tok = payload.get("tokenizer_dir")
    return PreparedData(Path(payload["entry"]), payload["key"], bool(payload["hit"]), payload["task"],
                        Path(tok) if tok else None, payload["info"], time.monotonic() - t0)


def _prepare_and_signal(cfg, env, sft_args, signal: Path) -> PreparedData:
    who = f"{socket.gethostname()} pid {os.getpid()}"
    try:
        with tokenizer_threads():
            prepared = prepare_data(cfg, env, sft_args)
    except BaseException as e:
        message = str(e) if isinstance(e, TuneLaunchError) else f"{type(e).__name__}: {e}"
        write_signal(signal, {"status": "failed", "message": message, "preparer": who})
        raise
    write_signal(signal, {"status": "ready", "entry": str(prepared.entry), "key": prepared.key, "hit": prepared.hit,
                          "task": prepared.task, "info": prepared.info, "preparer": who,
                          "tokenizer_dir": str(prepared.tokenizer_dir) if prepared.tokenizer_dir else None})
    return prepared
