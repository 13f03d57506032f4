"""The Trainer's part of the heartbeat: every optimizer step (with the median step time the launcher's stall
limit is derived from, the loss and tokens/s), every evaluation batch, and the save and eval phases.

Saves and evaluations are phases of their own (longer limits): the Trainer's `_save_checkpoint`, `save_model`
and `evaluate` are wrapped on the instance, so the phase is right whichever callback asked for the save.
Their time is not counted as step time. After train() returns, the final evaluation, checkpoint and model
(a full state dict gathered from every shard) are the consolidate phase.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import deque
from typing import Any, Callable

from transformers import TrainerCallback

from tune_launch import heartbeat

STEP_WINDOW = 50  # recent steps the median step time and tokens/s are taken over


class HeartbeatCallback(TrainerCallback):
    """Reports each optimizer step, micro-batch and evaluation batch to this rank's heartbeat."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.durations: deque[float] = deque(maxlen=STEP_WINDOW)
        self.tokens: deque[int] = deque(maxlen=STEP_WINDOW)
        self._t0: float | None = None
        self._tokens_seen = 0
        self._micro = 0
        self._eval_batches = 0
        self.ended = False  # train() returned: what follows (final eval, checkpoint, model) is consolidation

    def restart_timer(self) -> None:
        """A save or an evaluation just ended: the next step's time starts now."""
        self._t0 = self.clock()
        self._eval_batches = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        heartbeat.report_step(state.global_step, state.max_steps)
        self.restart_timer()

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro += 1
        heartbeat.report_progress("train", self._micro)

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self._t0 is not None:
            self.durations.append(now - self._t0)
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.tokens.append(seen - self._tokens_seen)
            self._tokens_seen = seen
        self._t0, self._micro = now, 0
        busy = sum(self.durations)
        heartbeat.report_step(state.global_step, state.max_steps, done=0,
                              step_s=statistics.median(self.durations) if self.durations else 0.0,
                              steps_timed=len(self.durations), tokens_per_s=sum(self.tokens) / busy if busy > 0 else 0.0)

    def on_prediction_step(self, args, state, control, **kwargs):
        self._eval_batches += 1
        heartbeat.report_progress("eval", self._eval_batches)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            heartbeat.report_metrics(loss=float(logs["loss"]), loss_step=state.global_step)
        if "eval_loss" in logs:
            heartbeat.report_metrics(eval_loss=float(logs["eval_loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = True
        heartbeat.report_phase("consolidate", "final evaluation, checkpoint and model")


def _in_phase(original: Callable[..., Any], phase_of: Callable[[], str], detail: Callable[[], str], callback: HeartbeatCallback):
    @functools.wraps(original)
    def in_phase(*args: Any, **kwargs: Any) -> Any:
        phase = phase_of()
        writer = heartbeat.current()
        before = (writer.get("phase"), writer.get("detail")) if writer is not None else None
        nested = before is not None and before[0] == "save"  # save_model inside _save_checkpoint
        if not nested:
            heartbeat.report_phase(phase, detail())
        try:
            return original(*args, **kwargs)
        finally:
            if before is not None and not nested:
                heartbeat.report_phase(*before)
            callback.restart_timer()

    return in_phase


def install_heartbeat(trainer: Any) -> HeartbeatCallback:
    """Add the callback and make saves and evaluations phases of their own; returns the callback."""
    callback = HeartbeatCallback()
    trainer.add_callback(callback)
    step = lambda: trainer.state.global_step  # noqa: E731
    # the final model (a full state dict gathered from every shard) is consolidation, with its longer limit
    final = lambda: "consolidate" if callback.ended else "save"  # noqa: E731
    trainer._save_checkpoint = _in_phase(trainer._save_checkpoint, lambda: "save", lambda: f"checkpoint-{step()}", callback)
    trainer.save_model = _in_phase(trainer.save_model, final, lambda: "final model" if callback.ended else "model", callback)
    trainer.evaluate = _in_phase(trainer.evaluate, lambda: "eval", lambda: "", callback)
    return callback
