"""Resuming a checkpoint on another number of processes: what changes (world size, gradient accumulation, the
checkpoint format DeepSpeed needs) and what must not (the global batch, so every optimizer step sees the same
samples; the data position; the LR schedule and optimizer step, which the Trainer restores itself).

`read_saved_run` reads what the checkpoint says about the run that wrote it, `decide_batch` and `plan_resume`
are pure, `ReshardRngMixin` is the Trainer hook for the per-rank random streams.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tune_launch.batching import accumulation_for, what_would
from tune_launch.errors import TuneLaunchError
from tune_launch.training.checkpoint import MARKER
from tune_launch.training.schema import TrainingConfig

log = logging.getLogger("tune_launch")
_RNG_FILE = re.compile(r"^rng_state_(\d+)\.pth$")


@dataclass(frozen=True)
class SavedRun:
    """The batch layout of the run that wrote a checkpoint (None where an older marker does not say)."""

    world_size: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    layout: str | None = None

    @property
    def global_batch(self) -> int | None:
        parts = (self.micro_batch_size, self.world_size, self.gradient_accumulation_steps)
        return parts[0] * parts[1] * parts[2] if all(parts) else None  # type: ignore[operator]


def read_saved_run(checkpoint: Path) -> SavedRun:
    """From the marker's fingerprint; the world size of checkpoints written before it recorded one is the
    number of per-rank RNG files the Trainer wrote (rng_state.pth alone: one process)."""
    try:
        fp = json.loads((checkpoint / MARKER).read_text()).get("fingerprint") or {}
    except (OSError, ValueError, AttributeError):
        fp = {}
    fp = fp if isinstance(fp, dict) else {}

    def num(key: str) -> int | None:
        value = fp.get(key)
        return value if isinstance(value, int) and value > 0 else None

    world = num("world_size") or _world_from_rng_files(checkpoint)
    return SavedRun(world, num("micro_batch_size"), num("gradient_accumulation_steps"),
                    fp.get("layout") if isinstance(fp.get("layout"), str) else None)


def _world_from_rng_files(checkpoint: Path) -> int | None:
    try:
        names = [p.name for p in checkpoint.iterdir()]
    except OSError:
        return None
    ranks = [int(m.group(1)) for n in names if (m := _RNG_FILE.match(n))]
    if ranks:
        return max(ranks) + 1
    return 1 if "rng_state.pth" in names else None


@dataclass(frozen=True)
class BatchDecision:
    """micro batch x world size x accumulation, and where the global batch came from."""

    micro: int
    world: int
    accumulation: int
    source: str  # "train.global_batch_size" | "checkpoint" | "train.gradient_accumulation_steps"

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accumulation

    def describe(self) -> str:
        return f"{self.global_batch} = micro batch {self.micro} x {self.world} process(es) x accumulation {self.accumulation}"


def micro_batch_of(cfg: TrainingConfig) -> int:
    """The micro batch the ranks run (the launcher resolves `auto`; a bare launch runs 1, as trainer.arguments)."""
    mb = cfg.train.micro_batch_size
    return mb if isinstance(mb, int) else 1


def decide_batch(cfg: TrainingConfig, world: int, saved: SavedRun | None, micro: int | None = None) -> BatchDecision:
    """Gradient accumulation for this world size. `train.global_batch_size` fixes the global batch; without it,
    a resume on another world size keeps the checkpoint's global batch (what the LR and the data position were
    tuned for); otherwise the YAML's accumulation stands. `micro`: the resolved micro batch (training/settings.py)."""
    micro = micro or micro_batch_of(cfg)
    target = cfg.train.global_batch_size
    if target:
        return BatchDecision(micro, world, accumulation_for(target, micro, world), "train.global_batch_size")
    if saved is not None and saved.global_batch and saved.world_size != world:
        kept = saved.global_batch
        if kept % (micro * world):
            raise TuneLaunchError(
                f"checkpoint.resume: the checkpoint's global batch {kept} ({saved.micro_batch_size} x {saved.world_size} "
                f"processes x {saved.gradient_accumulation_steps}) cannot be kept on {world} process(es) with micro batch "
                f"{micro}; {what_would(kept, micro, world)}; or set train.global_batch_size")
        return BatchDecision(micro, world, kept // (micro * world), "checkpoint")
    return BatchDecision(micro, world, cfg.train.gradient_accumulation_steps, "train.gradient_accumulation_steps")


def with_batch(cfg: TrainingConfig, batch: BatchDecision) -> TrainingConfig:
    """The config the ranks train with: the decided accumulation in place of the YAML's."""
    if cfg.train.gradient_accumulation_steps == batch.accumulation:
        return cfg
    train = cfg.train.model_copy(update={"gradient_accumulation_steps": batch.accumulation})
    return cfg.model_copy(update={"train": train})


@dataclass(frozen=True)
class ResumePlan:
    """How this run starts: from scratch or from `checkpoint`, with which batch layout."""

    checkpoint: Path | None
    saved: SavedRun
    batch: BatchDecision
    layout: str  # this run's checkpoint.layout_family

    @property
    def resharded(self) -> bool:
        return self.checkpoint is not None and self.saved.world_size not in (None, self.batch.world)

    @property
    def needs_universal(self) -> bool:
        """ZeRO keeps optimizer partitions per rank: another world size loads DeepSpeed's universal format."""
        return self.resharded and self.layout.startswith("deepspeed")

    def line(self) -> str | None:
        """The one line that says what changed since the checkpoint (None when nothing did)."""
        s, b = self.saved, self.batch
        if self.checkpoint is None:
            return f"global batch {b.describe()} (train.global_batch_size)" if b.source == "train.global_batch_size" else None
        changes = [f"world size {s.world_size} -> {b.world}"] if self.resharded else []
        if s.gradient_accumulation_steps not in (None, b.accumulation):
            changes.append(f"gradient accumulation {s.gradient_accumulation_steps} -> {b.accumulation}")
        if s.micro_batch_size not in (None, b.micro):
            changes.append(f"micro batch {s.micro_batch_size} -> {b.micro}")
        if not changes:
            return None
        if s.global_batch in (None, b.global_batch):
            kept = f"global batch kept: {b.describe()}"
        else:
            kept = (f"global batch {s.global_batch} -> {b.describe()} (the data position is counted in the new global "
                    "batch, so it is not exact)")
        how = {"fsdp": "; FSDP reshards the checkpoint on load"}.get(self.layout, "")
        if self.needs_universal:
            how = "; DeepSpeed loads it as a universal checkpoint"
        return f"resuming {self.checkpoint.name}: {', '.join(changes)}; {kept}{how}"

    def prepare(self, trainer, output_dir: Path, rank: int) -> dict:
        """After the fingerprint check, before train(): reseed per-rank RNG, convert and load universally (ZeRO).
        Returns the facts for the run report."""
        facts = {"from_world_size": self.saved.world_size, "to_world_size": self.batch.world,
                 "from_accumulation": self.saved.gradient_accumulation_steps, "to_accumulation": self.batch.accumulation,
                 "global_batch": self.batch.global_batch, "universal": None, "converted": False}
        if self.checkpoint is None:
            return facts
        if not self.resharded:
            if self.layout.startswith("deepspeed") and trainer.is_deepspeed_enabled:
                from tune_launch.training.universal import match_partition_order

                note = match_partition_order(trainer, self.checkpoint)
                if note and rank == 0:
                    log.info("%s", note)
            return facts
        trainer.tune_launch_saved_world = self.saved.world_size
        if self.needs_universal:
            from tune_launch.training.universal import enable_universal_loading, ensure_universal

            folder, converted = ensure_universal(self.checkpoint, output_dir, rank, self.saved.world_size)
            enable_universal_loading(trainer)
            facts.update(universal=str(folder), converted=converted)
        return facts


def plan_resume(cfg: TrainingConfig, world: int, checkpoint: Path | None, layout: str, micro: int | None = None) -> ResumePlan:
    saved = read_saved_run(checkpoint) if checkpoint is not None else SavedRun()
    return ResumePlan(checkpoint, saved, decide_batch(cfg, world, saved if checkpoint else None, micro), layout)


@dataclass(frozen=True)
class ResumeFacts:
    """What the launcher reads before it plans: the checkpoint this launch will resume, and its run's layout."""

    checkpoint: Path
    saved: SavedRun


def resume_facts(cfg: TrainingConfig) -> ResumeFacts | None:
    """The checkpoint the ranks will pick (checkpoint.resume), read without torch and without warnings (the
    ranks warn about skipped incomplete checkpoints themselves)."""
    from tune_launch.training.checkpoint import find_resume_checkpoint, resolve_resume

    setting = cfg.checkpoint.resume
    found = find_resume_checkpoint(Path(cfg.output_dir), warn=False) if setting == "auto" else resolve_resume(setting, Path(cfg.output_dir))
    return ResumeFacts(found, read_saved_run(found)) if found is not None else None


def resume_plan_for(cfg: TrainingConfig, world: int, micro: int, facts: ResumeFacts | None, layout: str) -> ResumePlan:
    """The ranks' decision, made ahead by the launcher for its plan (micro batch as the plan resolved it)."""
    return ResumePlan(facts.checkpoint if facts else None, facts.saved if facts else SavedRun(),
                      decide_batch(cfg, world, facts.saved if facts else None, micro), layout)


def rng_seed(seed: int, step: int, rank: int) -> int:
    """A per-rank seed for a resharded resume: reproducible, and different from every rank's start-of-run seed."""
    return ((seed * 1_000_003 + step) * 1_009 + rank + 1) % 2**32


class ReshardRngMixin:
    """Trainer mixin. The Trainer restores rng_state_<rank>.pth per rank; with another world size those files
    describe other ranks' streams (and rank r now gets other samples anyway), so every rank is reseeded from
    (seed, step, rank) instead: dropout stays reproducible, the data order (the sampler's own seed) is unaffected."""

    tune_launch_saved_world: int | None = None  # set by training.run on a resharded resume

    def _load_rng_state(self, checkpoint):  # type: ignore[override]
        saved = self.tune_launch_saved_world
        args = self.args  # type: ignore[attr-defined]
        if checkpoint is None or saved is None or saved == args.world_size:
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]
        from transformers import set_seed

        seed = rng_seed(args.seed, self.state.global_step, args.process_index)  # type: ignore[attr-defined]
        set_seed(seed)
        if args.process_index == 0:
            log.info("random streams reseeded per rank (checkpoint written by %d process(es), now %d): dropout masks "
                     "cannot match the old ranks'; the data order is unchanged", saved, args.world_size)
        return None
