"""`hub:` in the YAML: publish the run to the Hugging Face Hub through huggingface_hub, on the main process only.

- At the end: the final model (output_dir/final, or output_dir/consolidated when the launcher consolidates; then
  the launcher pushes it after consolidation) to the repository root.
- `strategy: checkpoint`: after every checkpoint, the newest one to `last-checkpoint/` (stale files there deleted),
  so a run can resume from the hub; `all_checkpoints`: each one to `checkpoint-N/`. These pushes run in a background
  thread, one at a time, from a hard-linked snapshot, so training goes on and checkpoint rotation cannot pull files
  away from an upload in progress.
The token comes only from HF_TOKEN in the environment and is never printed. A failed push is one warning line; the
local files stay where they are. `TUNE_LAUNCH_TEST_HUB_LOG=FILE` (tests only) records the calls in FILE instead of
touching the network: the upload edge is the only thing this module fakes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tune_launch.redaction import redact

log = logging.getLogger("tune_launch")
HUB_LOG_ENV = "TUNE_LAUNCH_TEST_HUB_LOG"
TOKEN_ENV = "HF_TOKEN"
LAST_CHECKPOINT = "last-checkpoint"
SNAPSHOTS = ".hub-snapshots"


@dataclass(frozen=True)
class Upload:
    """One folder to one place in the repository."""

    folder: Path
    path_in_repo: str  # "" is the repository root
    commit_message: str
    delete_patterns: tuple[str, ...] = ()


def final_upload(folder: Path, steps: int) -> Upload:
    return Upload(Path(folder), "", f"tune-launch: final model after {steps} steps")


def checkpoint_upload(strategy: str, checkpoint: Path) -> Upload | None:
    """Where a new checkpoint goes for a strategy (None: `end` pushes no checkpoints). Pure."""
    if strategy == "checkpoint":
        return Upload(checkpoint, LAST_CHECKPOINT, f"tune-launch: {checkpoint.name}", ("*",))
    if strategy == "all_checkpoints":
        return Upload(checkpoint, checkpoint.name, f"tune-launch: {checkpoint.name}")
    return None


# --------------------------------------------------------------------------- the network edge

class RecordingApi:
    """Stands in for HfApi in tests: appends each call, with the files it was given, to a JSONL file."""

    def __init__(self, path: str | os.PathLike[str], token: str | None) -> None:
        self.path, self.token = Path(path), token

    def _record(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**entry, "token_given": bool(self.token)}, sort_keys=True) + "\n")

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **_: Any) -> str:
        self._record({"op": "create_repo", "repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, path_in_repo: str | None = None,
                      commit_message: str | None = None, delete_patterns: Any = None, **_: Any) -> str:
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        self._record({"op": "upload_folder", "repo_id": repo_id, "folder": str(root), "path_in_repo": path_in_repo,
                      "commit_message": commit_message, "delete_patterns": delete_patterns, "files": files})
        return f"https://huggingface.co/{repo_id}/commit/recorded"


def make_api(env: Mapping[str, str] | None = None):
    """HfApi with the token from the environment (or the test recorder)."""
    env = os.environ if env is None else env
    token = (env.get(TOKEN_ENV) or "").strip() or None
    if env.get(HUB_LOG_ENV):
        return RecordingApi(env[HUB_LOG_ENV], token)
    from huggingface_hub import HfApi

    return HfApi(token=token if token else False)


def push(api, hub, upload: Upload) -> str | None:
    """Create the repository if needed and upload the folder; None on success, else the one line saying why not."""
    where = f"{hub.model_id}/{upload.path_in_repo}".rstrip("/")
    try:
        api.create_repo(hub.model_id, private=hub.private, exist_ok=True)
        api.upload_folder(repo_id=hub.model_id, folder_path=str(upload.folder), path_in_repo=upload.path_in_repo or None,
                          commit_message=upload.commit_message, delete_patterns=list(upload.delete_patterns) or None)
    except Exception as e:  # noqa: BLE001 - any failure of the push is reported, never raised: training is done
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return redact(f"hub: pushing {upload.folder} to {where} failed ({type(e).__name__}: {first}); "
                      f"the local copy is kept at {upload.folder}")
    log.info("hub: pushed %s to %s", upload.folder, where)
    return None


def push_final(cfg, folder: Path | None, steps: int, env: Mapping[str, str] | None = None, api=None) -> dict[str, Any]:
    """The end-of-run push, on the main process; returns what the run report records."""
    if cfg.hub is None or folder is None:
        return {}
    error = push(api or make_api(env), cfg.hub, final_upload(folder, steps))
    if error:
        log.warning("%s", error)
    return {"hub": {"model_id": cfg.hub.model_id, "pushed": str(folder), "error": error}}


# --------------------------------------------------------------------------- checkpoints during training

def snapshot(folder: Path, into: Path) -> Path:
    """Hard links of every file of `folder` under `into` (a copy where links are impossible): rotation may delete
    the checkpoint while the upload still reads it."""
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(folder, into, copy_function=_link_or_copy)
    return into


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class HubCheckpointPush(TrainerCallback):
    """strategy checkpoint / all_checkpoints: push each sealed checkpoint in the background, one at a time."""

    def __init__(self, hub, api=None) -> None:
        self.hub = hub
        self.api = api
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tune-launch-hub")
        self._pending: Future | None = None
        self._lock = threading.Lock()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        upload = checkpoint_upload(self.hub.strategy, checkpoint)
        if upload is None or not checkpoint.is_dir():
            return
        self.wait()  # one push at a time: the next waits for the previous
        snap = snapshot(checkpoint, Path(args.output_dir) / SNAPSHOTS / checkpoint.name)
        self._pending = self._pool.submit(self._push, replace(upload, folder=snap), checkpoint)

    def _push(self, upload: Upload, original: Path) -> None:
        api = self.api or make_api()
        error = push(api, self.hub, upload)
        shutil.rmtree(upload.folder, ignore_errors=True)
        if error:
            error = error.replace(str(upload.folder), str(original))
            log.warning("%s", error)
            with self._lock:
                self.errors.append(error)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.wait()
            shutil.rmtree(Path(args.output_dir) / SNAPSHOTS, ignore_errors=True)
