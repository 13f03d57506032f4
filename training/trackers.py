"""Metrics trackers keep their identity across restarts: one W&B run and one TensorBoard folder per training run.

Without this, every requeue or resume starts a new W&B run and a new `runs/<date>_<host>` folder, and a
preempted job's curves come in pieces. The identity (W&B run id, TensorBoard folder name) is chosen when a run
starts from step 0, written into every checkpoint (TRACKERS_FILE, sealed with it), and read back from the
checkpoint a run resumes from; it reaches the libraries through their own variables (WANDB_RUN_ID with
WANDB_RESUME=allow; the TensorBoard callback's folder unless TENSORBOARD_LOGGING_DIR is set). TensorBoard's writer is opened
with purge_step, so the steps redone after a resume replace the ones logged past the checkpoint.
"""

from __future__ import annotations

import json
import secrets
import socket
import string
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

TRACKERS_FILE = "tune_launch_trackers.json"
_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class TrackerIdentity:
    wandb_run_id: str
    tensorboard_name: str  # folder under output_dir/runs

    def to_text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def new_identity(now: datetime | None = None, host: str | None = None) -> TrackerIdentity:
    """A fresh W&B-style id (8 lowercase letters/digits) and transformers' folder name for TensorBoard."""
    stamp = (now or datetime.now()).strftime("%b%d_%H-%M-%S")
    return TrackerIdentity("".join(secrets.choice(_ID_ALPHABET) for _ in range(8)), f"{stamp}_{host or socket.gethostname()}")


def saved_identity(checkpoint: Path | None) -> TrackerIdentity | None:
    """The identity a checkpoint was written under (None for checkpoints from before this file existed)."""
    if checkpoint is None:
        return None
    try:
        data = json.loads((checkpoint / TRACKERS_FILE).read_text())
        return TrackerIdentity(str(data["wandb_run_id"]), str(data["tensorboard_name"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_identity(resume_from: Path | None) -> TrackerIdentity:
    return saved_identity(resume_from) or new_identity()


def wandb_env(identity: TrackerIdentity, output_dir: Path, env: MutableMapping[str, str]) -> dict[str, str]:
    """Point W&B at this identity through its variables (a user's own setting wins); returns what was set."""
    wanted = {
        "WANDB_RUN_ID": identity.wandb_run_id,
        "WANDB_RESUME": "allow",
        "WANDB_DIR": str(output_dir),  # the offline/online run files live with the run they belong to
    }
    set_now = {k: v for k, v in wanted.items() if k not in env}
    env.update(set_now)
    return set_now


def tensorboard_dir(identity: TrackerIdentity, output_dir: Path, env: MutableMapping[str, str]) -> Path:
    return Path(env.get("TENSORBOARD_LOGGING_DIR") or output_dir / "runs" / identity.tensorboard_name).expanduser()


def install_trackers(trainer, identity: TrackerIdentity, output_dir: Path, resumed_at_step: int,
                     env: MutableMapping[str, str]) -> None:
    """Before `train()`: W&B's variables, TensorBoard's folder and purge step, and the identity in every checkpoint."""
    wandb_env(identity, output_dir, env)
    trainer.tune_launch_files = {**getattr(trainer, "tune_launch_files", {}), TRACKERS_FILE: identity.to_text()}
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # pragma: no cover
        return
    old = next((cb for cb in trainer.callback_handler.callbacks if type(cb) is TensorBoardCallback), None)
    if old is None:
        return
    purge = resumed_at_step + 1 if resumed_at_step else None

    class StableTensorBoardCallback(TensorBoardCallback):
        """The same folder for every part of the run; after a resume, steps past the checkpoint are purged."""

        def _init_summary_writer(self, args):
            if self._SummaryWriter is not None:
                self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=purge)

    new = StableTensorBoardCallback(tb_writer=None)
    new.logging_dir = str(tensorboard_dir(identity, output_dir, env))
    trainer.remove_callback(old)
    trainer.add_callback(new)
