"""Cross-field rules of the run's schedule and outputs: strategies, the best checkpoint, consolidation, the hub.

Called by `TrainingConfig`'s validator (training/schema.py); each rule raises ValueError with one line naming the
key and the fix. No torch import.
"""

from __future__ import annotations

from typing import Any

from tune_launch.errors import did_you_mean

SFT_EVAL_METRICS = ("loss", "mean_token_accuracy", "entropy")  # what TRL's SFTTrainer logs at evaluation


def check_schedules(cfg: Any) -> None:
    """A step interval next to an epoch strategy would be silently ignored."""
    ck, ev = cfg.checkpoint, cfg.eval
    if ck.save_strategy == "epoch" and "save_steps" in ck.model_fields_set:
        raise ValueError("checkpoint.save_steps: saves happen per epoch (checkpoint.save_strategy: epoch); drop save_steps")
    if ev.eval_strategy == "epoch" and "eval_steps" in ev.model_fields_set:
        raise ValueError("eval.eval_steps: evaluations happen per epoch (eval.eval_strategy: epoch); drop eval_steps")


def check_best_model(cfg: Any) -> None:
    """Best checkpoint, early stopping and consolidate.checkpoint: best need an eval split, a metric the run
    logs, and a checkpoint at every evaluation that can be the best."""
    ev, ck = cfg.eval, cfg.checkpoint
    metric = ev.best_metric
    wants = ("eval.load_best_model_at_end" if ev.load_best_model_at_end else "eval.early_stopping" if ev.early_stopping
             else "eval.metric_for_best_model" if ev.metric_for_best_model else
             "consolidate.checkpoint" if cfg.consolidate.checkpoint == "best" else None)
    if wants is None:
        return
    if metric is None:
        raise ValueError("consolidate.checkpoint: best needs a metric that says which checkpoint is best; set "
                         "eval.metric_for_best_model (e.g. loss) or eval.load_best_model_at_end: true")
    if not cfg.has_eval:
        raise ValueError(f"{wants}: needs evaluation data; add data.eval or data.eval_fraction (e.g. 0.05)")
    known = SFT_EVAL_METRICS if cfg.task == "sft" else ("loss",)
    if metric not in known:
        raise ValueError(f"eval.metric_for_best_model: '{ev.metric_for_best_model}' is not a metric task {cfg.task} "
                         f"evaluates{did_you_mean(metric, list(known))}; use one of {', '.join(known)}")
    if metric.endswith("loss") and ev.greater_is_better:
        raise ValueError(f"eval.greater_is_better: true would keep the checkpoint with the highest {metric}; "
                         "drop it (false for a loss)")
    if not (ev.load_best_model_at_end or cfg.consolidate.checkpoint == "best"):
        return
    if ck.save_strategy != ev.eval_strategy:
        raise ValueError(f"eval.eval_strategy: the best checkpoint is picked at evaluations, so save and evaluate on "
                         f"one schedule (checkpoint.save_strategy {ck.save_strategy}, eval.eval_strategy {ev.eval_strategy})")
    eval_steps = ev.eval_steps or ck.save_steps
    if ck.save_strategy == "steps" and ck.save_steps % eval_steps:
        raise ValueError(f"checkpoint.save_steps: {ck.save_steps} is not a multiple of eval.eval_steps {eval_steps}, so "
                         f"evaluated steps may have no checkpoint to keep; use save_steps {eval_steps} (or a multiple)")


def check_outputs(cfg: Any) -> None:
    c = cfg.consolidate
    if "checkpoint" in c.model_fields_set and not c.enabled:
        raise ValueError("consolidate.checkpoint: chooses what consolidation streams; add consolidate.enabled: true")
    if cfg.hub is not None and not (cfg.checkpoint.save_final_model or c.enabled):
        raise ValueError("hub: nothing to push at the end (checkpoint.save_final_model is false and consolidate.enabled "
                         "is not set); enable one of them")

