"""Atomic checkpoints and resume discovery.

A checkpoint is written by every rank into output_dir/.staging/checkpoint-N, then the saving process
fsyncs every file, writes MARKER (a manifest of file sizes) and renames the folder to
output_dir/checkpoint-N. A folder without the marker, or with a file whose size differs from the
manifest (truncated), is not a checkpoint: resume skips it with a warning. So a crash loses at most
one save interval.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tune_launch.durable import fsync_dir
from tune_launch.profiles import get_profile

log = logging.getLogger("tune_launch")
MARKER = "tune_launch_complete.json"
STAGING = ".staging"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- discovery (pure file inspection)

@dataclass(frozen=True)
class CheckpointStatus:
    path: Path
    step: int
    complete: bool
    reason: str = ""


def inspect_checkpoint(path: Path) -> CheckpointStatus:
    """Complete when the marker exists and every listed file is there with its recorded size."""
    m = _CKPT.match(path.name)
    step = int(m.group(1)) if m else -1
    marker = path / MARKER
    if not marker.is_file():
        return CheckpointStatus(path, step, False, f"no completion marker {MARKER}")
    try:
        manifest = json.loads(marker.read_text())
        files: dict[str, int] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return CheckpointStatus(path, step, False, f"unreadable {MARKER}")
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return CheckpointStatus(path, step, False, f"missing file {rel}")
        if f.stat().st_size != size:
            return CheckpointStatus(path, step, False, f"truncated file {rel} ({f.stat().st_size} of {size} bytes)")
    return CheckpointStatus(path, step, True)


def list_checkpoints(output_dir: Path) -> list[CheckpointStatus]:
    """checkpoint-N folders in output_dir, newest step first."""
    if not output_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in output_dir.iterdir() if p.is_dir() and _CKPT.match(p.name)]
    return sorted(found, key=lambda s: s.step, reverse=True)


def find_resume_checkpoint(output_dir: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning."""
    for status in list_checkpoints(output_dir):
        if status.complete:
            return status.path
        if warn:
            log.warning("skipping incomplete checkpoint %s: %s", status.path, status.reason)
    return None


def resolve_resume(setting: str, output_dir: Path) -> Path | None:
    """checkpoint.resume: 'auto' -> newest complete, 'never' -> None, else that folder (must be complete)."""
    if setting == "never":
        return None
    if setting == "auto":
        return find_resume_checkpoint(output_dir)
    status = inspect_checkpoint(Path(setting))
    if not status.complete:
        from tune_launch.training.config import ConfigError

        raise ConfigError(f"checkpoint.resume: {setting} is not a complete checkpoint ({status.reason}); "
                          "use 'auto' to pick the newest complete one")
    return Path(setting)


# --------------------------------------------------------------------------- compatibility

def run_fingerprint(cfg, info, model, micro_batch_size: int) -> dict:
    """What a checkpoint must share with the run that resumes it (the task, the model's parameter counts: a
    different base model or LoRA on/off changes them, the LoRA shape, the checkpoint layout), and the batch
    layout that wrote it (world size, micro batch, accumulation), which a resume may change (training/reshard.py)."""
    lora = cfg.model.lora
    return {"task": cfg.task,
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora": None if lora is None else {"r": lora.r, "target_modules": lora.target_modules},
            "layout": get_profile(info.profile).layout_family,
            "world_size": info.world_size,
            "micro_batch_size": micro_batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps}


# Fields a resume cannot change: why, and what to do instead (kept short: the launcher's verdict shows 300 characters).
# The world size is not among them: FSDP reshards on load, DeepSpeed goes through a universal checkpoint
# (training/reshard.py, training/universal.py).
REFUSALS = {
    "task": "{where} is a {saved} checkpoint and this run is {current}: one task cannot continue as another",
    "layout": "{where} holds {saved_name} shards, which {current_name} cannot load: resume with --profile {profiles}, or "
              "`tune-launch consolidate` it and start a new run from that",
    "lora": "{where} holds {saved_name}, this run trains {current_name}: they do not load into each other; resume with "
            "the same model.lora, or merge or consolidate it and start a new run from that",
    "total_params": "{where} holds a model of {saved} parameters, this run's has {current}: resume with the model that wrote it",
    "trainable_params": "{where} trains {saved} parameters, this run {current}: resume with the same model and model.lora",
}
FAMILY_PROFILES = {"fsdp": "fsdp or fsdp-offload", "deepspeed-zero2": "zero2 or zero2-offload",
                   "deepspeed-zero3": "zero3 or zero3-offload", "plain": "cpu, single-gpu or ddp"}
FAMILY_NAMES = {"fsdp": "FSDP", "deepspeed-zero2": "DeepSpeed ZeRO-2", "deepspeed-zero3": "DeepSpeed ZeRO-3",
                "plain": "full-weight (cpu, single-gpu, ddp)"}
START_OVER = " (or start over: a new output_dir, or checkpoint.resume: never)"


def _describe(key: str, value) -> str:
    if key == "layout":
        return FAMILY_NAMES.get(str(value), str(value))
    if key == "lora":
        return "full weights" if value is None else f"LoRA adapters (r={value.get('r')})"
    return f"{value:,}" if isinstance(value, int) else str(value)


def incompatibility(saved: dict, current: dict, where: str = "the checkpoint") -> str | None:
    """Why the first field that differs between a checkpoint's fingerprint and this run's cannot be resumed, and
    what to do instead; fields an older marker lacks are not compared."""
    for key, why in REFUSALS.items():
        if key in saved and key in current and saved[key] != current[key]:
            return why.format(where=where, saved=_describe(key, saved[key]), current=_describe(key, current[key]),
                              saved_name=_describe(key, saved[key]), current_name=_describe(key, current[key]),
                              profiles=FAMILY_PROFILES.get(str(saved[key]), "the profile that wrote it"))
    return None


def check_resume_compatible(checkpoint: Path, fingerprint: dict) -> None:
    """Refuse, in one line, to resume a run from a checkpoint another kind of run wrote into the same output_dir
    (transformers would fail deep inside with a shape or key traceback). Older checkpoints carry no fingerprint."""
    try:
        saved = json.loads((checkpoint / MARKER).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(saved, dict):
        return
    why = incompatibility(saved, fingerprint, where=f"{checkpoint.parent.name}/{checkpoint.name}")
    if why is not None:
        from tune_launch.training.config import ConfigError

        raise ConfigError(f"checkpoint.resume: {why}{START_OVER}")


# --------------------------------------------------------------------------- writing

def fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and folder under root; return {relative path: size}."""
    sizes: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            sizes[str(p.relative_to(root))] = p.stat().st_size
        fsync_dir(Path(dirpath))
    return sizes


def seal(staging: Path, final: Path, step: int, fingerprint: dict | None = None) -> Path:
    """fsync, write the marker, rename staging -> final (replacing a stale folder of that name)."""
    sizes = fsync_tree(staging)
    marker = staging / MARKER
    tmp = staging / (MARKER + ".tmp")
    manifest = {"step": step, "files": sizes, **({"fingerprint": fingerprint} if fingerprint else {})}
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, marker)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


class AtomicCheckpointMixin:
    """Trainer mixin: HF's _save_checkpoint writes into the staging folder, then the folder is sealed."""

    _staging_root: str | None = None
    _rotation_limit: int | None = None  # save_total_limit while train() runs (transformers' own rotation is off)
    tune_launch_fingerprint: dict | None = None  # set by training.run: recorded in every checkpoint's marker
    tune_launch_files: dict[str, str] = {}  # name -> text written into every checkpoint (tracker ids: training/trackers.py)

    def train(self, *args, **kwargs):  # type: ignore[override]
        """Rotation is ours (`_rotate`, after each seal): with a best checkpoint and save_total_limit 1, transformers'
        own would delete the newest checkpoint at the end of train(), which resume needs."""
        targs = self.args  # type: ignore[attr-defined]
        self._rotation_limit, targs.save_total_limit = targs.save_total_limit, None
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            targs.save_total_limit, self._rotation_limit = self._rotation_limit, None

    def _get_output_dir(self, trial):  # type: ignore[override]
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        args = self.args  # type: ignore[attr-defined]
        step = self.state.global_step  # type: ignore[attr-defined]
        started = time.perf_counter()
        run_dir = Path(args.output_dir)
        staging_root = run_dir / STAGING
        staging = staging_root / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a crash during an earlier save
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        previous = args.save_total_limit  # None inside train(), where `_rotation_limit` holds it
        limit = previous if previous is not None else self._rotation_limit
        args.save_total_limit = None  # rotation happens below, in the real folder, after sealing
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
            args.save_total_limit = previous
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # every rank's shard is written
        final = run_dir / staging.name
        from tune_launch.training.best import point_at_sealed

        point_at_sealed(self, run_dir, staging if args.should_save else None)  # the best is recorded by its sealed path
        if args.should_save:
            _save_model_files(self, staging)
            for name, text in self.tune_launch_files.items():
                (staging / name).write_text(text)
            seal(staging, final, step, self.tune_launch_fingerprint)
            _rotate(run_dir, limit, self.state.best_model_checkpoint)  # type: ignore[attr-defined]
            from tune_launch.training.progress import checkpoint_line

            # one line, on the console and in the node log: name, bytes sealed, seconds from the first byte to the rename
            log.info("%s", checkpoint_line(final.name, sealed_bytes(final), time.perf_counter() - started),
                     extra={"tl_progress": "event"})
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]


def sealed_bytes(folder: Path) -> int:
    """Bytes of a sealed checkpoint, from its manifest (no second walk over the files)."""
    try:
        return sum(json.loads((folder / MARKER).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _save_model_files(trainer, folder: Path) -> None:
    """config.json and the tokenizer in every checkpoint: sharded FSDP saves write neither, and consolidation
    (`tune-launch consolidate`) needs them to produce a loadable model folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    if config is not None and not (folder / "config.json").exists():
        config.save_pretrained(str(folder))
    tokenizer = getattr(trainer, "processing_class", None)
    if tokenizer is not None and not (folder / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(str(folder))


def _rotate(run_dir: Path, limit: int | None, best: str | os.PathLike[str] | None = None) -> None:
    """Keep the newest `limit` complete checkpoints; incomplete ones older than the newest complete go too.

    The best checkpoint (eval.metric_for_best_model) is never deleted. As in transformers it counts within the
    limit, taking the place of the oldest kept one, except that the newest always stays (resume needs it): a limit
    of 2 keeps the best and the newest, a limit of 1 keeps both too."""
    if not limit:
        return
    statuses = list_checkpoints(run_dir)
    complete = [s for s in statuses if s.complete]
    keep = {s.path for s in complete[:limit]}
    best_path = next((s.path for s in complete if best is not None and s.path.name == Path(best).name), None)
    if best_path is not None and best_path not in keep:
        keep = {s.path for s in complete[:max(limit - 1, 1)]} | {best_path}
    newest = complete[0].step if complete else -1
    for s in statuses:
        if s.path not in keep and (s.complete or s.step < newest):
            shutil.rmtree(s.path, ignore_errors=True)
