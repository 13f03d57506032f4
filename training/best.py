"""The best checkpoint and early stopping: picked by transformers, kept and reloadable under tune-launch's checkpoints.

transformers records the best checkpoint as `<run dir>/checkpoint-N` at save time. tune-launch's atomic save
(training/checkpoint.py) writes into output_dir/.staging and renames after sealing, so the recorded path would
point at a folder that no longer exists: `load_best_model_at_end` would then warn and keep the last weights, and
a resumed run would drop the best checkpoint. `point_at_sealed` fixes the state and the checkpoint's
trainer_state.json before the seal; rotation (`checkpoint._rotate`) never deletes the best one. Reloading then
goes through the Trainer's own loader for every layout: safetensors or adapters (plain, DDP, LoRA), DCP shards
(FSDP: `load_fsdp_model`), the ZeRO engine state (DeepSpeed: `deepspeed_load_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

log = logging.getLogger("tune_launch")


def best_model_arguments(cfg) -> dict[str, Any]:
    """TrainingArguments fields for eval.load_best_model_at_end / metric_for_best_model / greater_is_better. Pure."""
    metric = cfg.eval.best_metric
    if metric is None or not cfg.has_eval:
        return {"load_best_model_at_end": False}
    return {"load_best_model_at_end": cfg.eval.load_best_model_at_end, "metric_for_best_model": f"eval_{metric}",
            "greater_is_better": cfg.eval.higher_is_better}


def point_at_sealed(trainer, run_dir: Path, staging: Path | None) -> None:
    """Make state.best_model_checkpoint the sealed `run_dir/checkpoint-N` (on every rank), and record that path in
    the staging folder's trainer_state.json (on the saving process, before the seal)."""
    state = trainer.state
    step = getattr(state, "best_global_step", None)
    if not step:
        return
    best = run_dir / f"checkpoint-{step}"
    state.best_model_checkpoint = str(best) if (step == state.global_step or best.is_dir()) else None
    state_file = staging / "trainer_state.json" if staging is not None else None
    if state_file is not None and state_file.is_file():
        saved = json.loads(state_file.read_text())
        saved["best_model_checkpoint"] = state.best_model_checkpoint
        state_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping; also records where it stopped, and continues its count after a resume
    (transformers restores callback state only with restore_callback_states_from_checkpoint)."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0) -> None:
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) and saved else saved
        if isinstance(saved, dict) and state.global_step:
            counter = saved.get("attributes", {}).get("early_stopping_patience_counter")
            if isinstance(counter, int):
                self.early_stopping_patience_counter = counter

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if self.stopped_at is None and self.early_stopping_patience_counter >= self.early_stopping_patience:
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                log.info("early stopping at step %d: %s did not improve by more than %g for %d evaluation(s); best %s "
                         "at step %s", state.global_step, args.metric_for_best_model, self.early_stopping_threshold,
                         self.early_stopping_patience, state.best_metric, state.best_global_step)


class FinalStepSave(TrainerCallback):
    """Save a checkpoint at the step training ends (max steps, or an early stop), whatever the save schedule:
    consolidation of the last checkpoint must find the last weights on disk, not the best ones reloaded."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True

    def on_evaluate(self, args, state, control, **kwargs):
        if control.should_training_stop:
            control.should_save = True


def best_facts(trainer) -> dict[str, Any]:
    """For the run report: the best checkpoint (step, metric, value, folder, reloaded or not) and an early stop."""
    st, args = trainer.state, trainer.args
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStopping)), None)
    best = None
    step = getattr(st, "best_global_step", None)
    if step and st.best_metric is not None and args.metric_for_best_model:
        folder = Path(st.best_model_checkpoint) if st.best_model_checkpoint else None
        folder = folder if folder is not None and folder.is_dir() else None
        best = {"step": int(step), "metric": args.metric_for_best_model, "value": float(st.best_metric),
                "checkpoint": str(folder.resolve()) if folder else None,
                "loaded_at_end": bool(args.load_best_model_at_end and folder)}
    stopped = None
    if early is not None and early.stopped_at is not None:
        stopped = {"step": early.stopped_at, "patience": early.early_stopping_patience,
                   "threshold": early.early_stopping_threshold}
    return {"best": best, "early_stopped": stopped}


def best_summary(report: dict[str, Any]) -> list[str]:
    """Summary lines for the best checkpoint and an early stop (none when neither applies)."""
    lines = []
    b, stop = report.get("best"), report.get("early_stopped")
    if b:
        where = f" ({b['checkpoint']})" if b.get("checkpoint") else ""
        loaded = "; the final model is this one" if b.get("loaded_at_end") else ""
        lines.append(f"  best: {b['metric']} {b['value']:.4f} at step {b['step']}{where}{loaded}")
    if stop:
        lines.append(f"  stopped early at step {stop['step']}: no improvement for {stop['patience']} evaluation(s)")
    return lines
