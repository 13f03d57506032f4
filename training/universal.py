"""DeepSpeed ZeRO checkpoints on another world size: converted once to DeepSpeed's universal checkpoint, cached
next to the original, loaded with DeepSpeed's universal loader.

A ZeRO checkpoint keeps each rank's optimizer partition in its own file, so DeepSpeed refuses to load it with
another data-parallel world size. `deepspeed.checkpoint.ds_to_universal` rewrites it per parameter (fp32 weights
and Adam moments, whole): any world size loads that. `--inject_missing_state` because the Trainer's saves carry
no universal_checkpoint_info.

Atomic like every other write: the conversion runs in a subprocess into output_dir/.staging/, is sealed there
with a marker (training/checkpoint.py's `seal`) and renamed to checkpoint-N/global_stepN_universal; then
checkpoint-N/latest_universal names it (what DeepSpeed's loader reads). The original files are never written,
so a kill -9 at any moment leaves the checkpoint as it was, and the next resume converts again. Later resumes
reuse the sealed folder.

Once per job: global rank 0 converts while the others poll the shared filesystem (no collective: a conversion
longer than the collective timeout must not fail them) and stop with rank 0's message if it fails, or if its
heartbeat stops changing (rank 0 died on another node).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from transformers import TrainerCallback

from tune_launch.durable import fsync_dir
from tune_launch.errors import TuneLaunchError
from tune_launch.training.checkpoint import STAGING, inspect_checkpoint, seal

log = logging.getLogger("tune_launch")
LATEST = "latest_universal"  # the file DeepSpeed's load_checkpoint reads when checkpoint.load_universal is on
SUFFIX = "_universal"
HEARTBEAT_S = 5.0
STALE_S = 300.0  # rank 0's heartbeat unchanged this long: it is gone (generous for NFS attribute caching)
POLL_S = 0.5
SPACE_FACTOR = 2.2  # the universal folder is about the size of the ZeRO files, plus ds_to_universal's temp copy


class ConversionError(TuneLaunchError):
    """The universal conversion could not be done; names the checkpoint and what to do."""


# --------------------------------------------------------------------------- where things are (pure file inspection)

def zero_tag(checkpoint: Path) -> str:
    """The ZeRO tag folder (global_stepN) the checkpoint's `latest` file names, else its only global_step folder."""
    latest = checkpoint / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (checkpoint / tag).is_dir():
            return tag
    tags = sorted(p.name for p in checkpoint.glob("global_step*") if p.is_dir() and not p.name.endswith(SUFFIX))
    if len(tags) != 1:
        raise ConversionError(f"checkpoint.resume: {_short(checkpoint)} holds {len(tags)} DeepSpeed global_step folders "
                              "and no usable `latest` file, so it cannot be converted for another world size; resume "
                              "on the number of processes that wrote it")
    return tags[0]


def universal_dir(checkpoint: Path) -> Path:
    return checkpoint / (zero_tag(checkpoint) + SUFFIX)


def is_ready(checkpoint: Path) -> bool:
    """The sealed universal folder exists and latest_universal names it."""
    target = universal_dir(checkpoint)
    latest = checkpoint / LATEST
    return (inspect_checkpoint(target).complete and latest.is_file()
            and latest.read_text().strip() == target.name)


# --------------------------------------------------------------------------- converting (rank 0)

def converter_command(source: Path, dest: Path, cpus: int | None = None) -> list[str]:
    """DeepSpeed's ds_to_universal through training/zero_universal.py (its round-robin mapping fix and weight
    check), with DeepSpeed's default of 4 extract workers capped by the cores."""
    workers = min(4, cpus or os.cpu_count() or 1)
    return [sys.executable, "-m", "tune_launch.training.zero_universal", str(source), str(dest), "--workers", str(workers)]


def convert(checkpoint: Path, work: Path, log_path: Path, source_world: int | None) -> Path:
    """Convert into `work` (a fresh staging folder), seal, rename next to the original, point latest_universal at it."""
    tag = zero_tag(checkpoint)
    final = checkpoint / (tag + SUFFIX)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _check_space(checkpoint / tag, work)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # a CPU job: no GPU memory taken
    started = time.perf_counter()
    with open(log_path, "w") as fh:
        code = subprocess.run(converter_command(checkpoint / tag, work / final.name), stdout=fh,
                              stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if code != 0 or not (work / final.name / "zero").is_dir():
        raise ConversionError(f"checkpoint.resume: converting {_short(checkpoint)} for another world size failed: "
                              f"{_last_line(log_path)}; resume on {source_world or 'the number of'} processes (no "
                              f"conversion), or see {log_path}")
    step = int(tag.removeprefix("global_step")) if tag.removeprefix("global_step").isdigit() else -1
    try:
        seal(work / final.name, final, step, {"universal_of": tag, "source_world_size": source_world})
        write_latest(checkpoint, final.name)
    except OSError as e:
        raise ConversionError(f"checkpoint.resume: cannot write the universal checkpoint next to {checkpoint} "
                              f"({e.strerror or e}); make that folder writable, or copy the checkpoint into "
                              "output_dir and resume from the copy") from None
    shutil.rmtree(work, ignore_errors=True)
    log.info("converted %s to a universal checkpoint in %.1f s: %s", checkpoint.name, time.perf_counter() - started, final)
    return final


def write_latest(checkpoint: Path, name: str) -> None:
    tmp = checkpoint / (LATEST + ".tmp")
    tmp.write_text(name)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, checkpoint / LATEST)
    fsync_dir(checkpoint)


def _check_space(source: Path, work: Path) -> None:
    need = SPACE_FACTOR * sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    free = shutil.disk_usage(work).free
    if free < need:
        raise ConversionError(f"checkpoint.resume: converting {_short(source.parent)} for another world size needs about "
                              f"{need / 1024**3:.1f} GiB in {work.parent}, {free / 1024**3:.1f} GiB are free; free disk "
                              "space, or resume on the number of processes that wrote it (no conversion)")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or ["no output"])[-1][:100]


def _short(checkpoint: Path) -> str:
    """output_dir/checkpoint-N as its last two parts: the launcher's verdict line shows 300 characters."""
    return f"{checkpoint.parent.name}/{checkpoint.name}"


class _Heartbeat:
    """A counter rewritten every HEARTBEAT_S while rank 0 converts; waiters watch it change."""

    def __init__(self, path: Path) -> None:
        self.path, self._stop = path, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tune-launch-universal-heartbeat", daemon=True)

    def _beat(self) -> None:
        n = 0
        while True:
            n += 1
            try:
                self.path.write_text(str(n))
            except OSError:
                pass
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- once per job

def ensure_universal(checkpoint: Path, output_dir: Path, rank: int, source_world: int | None) -> tuple[Path, bool]:
    """The universal folder for `checkpoint`, converted now by rank 0 unless a sealed one is there already.
    Returns (folder, converted by this job)."""
    token, ready = _agree(rank, is_ready(checkpoint) if rank == 0 else None)  # rank 0's view decides for all
    folder = universal_dir(checkpoint)
    if ready:
        log.info("reusing the universal checkpoint %s (converted by an earlier resume)", folder)
        return folder, False
    staging = output_dir / STAGING
    base = f"universal-{checkpoint.name}-"
    failed, beat = staging / f"{base}{token}.failed", staging / f"{base}{token}.heartbeat"
    if rank != 0:
        _wait_for_rank0(checkpoint, failed, beat)
        return folder, True
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.glob(base + "*"):  # a killed attempt's folder, heartbeat or failure note
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    if inspect_checkpoint(folder).complete:  # sealed, then killed before latest_universal was written
        write_latest(checkpoint, folder.name)
        return folder, False
    log.info("converting %s (written by %s process(es)) to a universal checkpoint, once for this job",
             checkpoint.name, source_world or "?")
    with _Heartbeat(beat):
        try:
            return convert(checkpoint, staging / f"{base}{token}", output_dir / ".tune_launch" / f"{base}convert.log",
                           source_world), True
        except TuneLaunchError as e:
            failed.write_text(str(e))
            raise


def _agree(rank: int, ready: bool | None) -> tuple[str, bool]:
    """One id per attempt and rank 0's verdict, broadcast to every rank (all are at the same point, so this
    collective is quick): a waiter never mistakes an earlier attempt's note for this one's, and a rank with a
    stale view of a shared filesystem follows rank 0."""
    import torch.distributed as dist

    agreed = [(uuid.uuid4().hex[:12], bool(ready)) if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(agreed, src=0)
    return agreed[0]  # type: ignore[return-value]


def _wait_for_rank0(checkpoint: Path, failed: Path, beat: Path, stale_s: float = STALE_S) -> None:
    last, changed, said = None, time.monotonic(), time.monotonic()
    while not is_ready(checkpoint):
        if failed.is_file():
            raise ConversionError(failed.read_text().strip() or f"rank 0 failed to convert {checkpoint}")
        try:
            now = beat.read_text()
        except OSError:
            now = None
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed > stale_s:
            raise ConversionError(f"checkpoint.resume: rank 0 stopped converting {_short(checkpoint)} (no heartbeat "
                                  f"for {stale_s:.0f} s); the next resume converts again")
        if time.monotonic() - said > 60:
            log.info("waiting for rank 0 to convert %s to a universal checkpoint", checkpoint.name)
            said = time.monotonic()
        time.sleep(POLL_S)


# --------------------------------------------------------------------------- loading

def _run_configs(trainer) -> list[dict]:
    """The DeepSpeed config dicts train() builds the engine from (accelerate's plugin; one object or two)."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    return list({id(c): c for c in (plugin.deepspeed_config, plugin.hf_ds_config.config)}.values())


def enable_universal_loading(trainer) -> None:
    """`checkpoint: {load_universal: true}`: DeepSpeed's load_checkpoint reads latest_universal and restores each
    rank's partition from it. Without round_robin_gradients: with it (and no alignment padding) DeepSpeed 0.19.8
    maps the universal state into the wrong places of a reordered partition (training/zero_universal.py); the
    checkpoints this run writes then record the setting, and later resumes follow them (`match_partition_order`)."""
    for config in _run_configs(trainer):
        config.setdefault("checkpoint", {})["load_universal"] = True
        config.setdefault("zero_optimization", {})["round_robin_gradients"] = False
    trainer.add_callback(UntieStepCounters())


class UntieStepCounters(TrainerCallback):
    """After a universal ZeRO-3 load. DeepSpeed 0.19.8 gives every optimizer sub-group the same `step` tensor
    object from optimizer_state.pt; torch's AdamW increments it in place once per group, so from the second group
    on the bias correction runs ahead (measured: a 3e-4 loss difference one step after the resume). on_train_begin
    runs after the Trainer loaded the checkpoint and before the first step: one tensor per group again."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        seen: set[int] = set()
        for group_state in getattr(inner, "state", {}).values():
            step = group_state.get("step") if isinstance(group_state, dict) else None
            if step is not None and hasattr(step, "clone"):
                if id(step) in seen:
                    group_state["step"] = step.clone()
                seen.add(id(step))


def saved_round_robin(checkpoint: Path) -> bool | None:
    """round_robin_gradients of the ZeRO-1/2 run that wrote `checkpoint` (from its model states, memory-mapped)."""
    import torch

    model_file = checkpoint / zero_tag(checkpoint) / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        return None  # ZeRO-3, whose partitions are not reordered
    state = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    zero = (state.get("ds_config") or {}).get("zero_optimization") or {}
    return bool(zero.get("round_robin_gradients", False))


def match_partition_order(trainer, checkpoint: Path) -> str | None:
    """A same-world ZeRO-1/2 resume copies each rank's flat partition as saved, so it must lay parameters out as
    the checkpoint did: round_robin_gradients follows the checkpoint (a universal resume turned it off)."""
    saved = saved_round_robin(checkpoint)
    configs = _run_configs(trainer)
    now = bool((configs[0].get("zero_optimization") or {}).get("round_robin_gradients", False))
    if saved is None or saved == now:
        return None
    for config in configs:
        config.setdefault("zero_optimization", {})["round_robin_gradients"] = saved
    return f"zero_optimization.round_robin_gradients {now} -> {saved}: {checkpoint.name} lays its partitions out that way"
