"""SIGTERM / SIGUSR1 on any rank -> one atomic checkpoint at the next step boundary on every rank, then a clean exit.

The signal handler only records the request. At each optimizer step end the ranks agree (all-reduce MAX of
the flag), so a signal that reached one rank, or reached ranks at different steps, still gives one
checkpoint at one step everywhere. After the sealed checkpoint (`on_save`) every rank leaves the process
group and exits 0. A watchdog thread learns of the signal at once (set_wakeup_fd, even while the main thread
is blocked in C++) and ends the process after the grace period if no clean stop was reached: a stop is
bounded, and the newest complete checkpoint is never touched by it.
A signal before the training loop starts (loading, tokenizing) exits at once: there is nothing to save.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from transformers import TrainerCallback

from tune_launch import heartbeat
from tune_launch.errors import TuneLaunchError
from tune_launch.protocol import grace_seconds

log = logging.getLogger("tune_launch")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOPPED_MARKER = "stopped_by_signal.json"


def _flush() -> None:
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except (OSError, ValueError):
            pass
    sys.stdout.flush()
    sys.stderr.flush()


def _agree(flag: bool) -> bool:
    """True on every rank when any rank asked to stop (one tiny all-reduce per optimizer step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class GracefulStop(TrainerCallback):
    """Turns a stop signal into `should_save` + `should_training_stop`, then exits after the checkpoint is sealed."""

    def __init__(self, rank: int = 0, grace_s: float | None = None, exit_fn: Callable[[int], None] = os._exit) -> None:
        self.rank = rank
        self.grace_s = grace_seconds() if grace_s is None else grace_s
        self.exit_fn = exit_fn
        self.signum: int | None = None
        self.received_at: float | None = None
        self.started = False
        self.stopping = False
        self._wake_r: int | None = None

    # ------------------------------------------------------------------ installation (main thread only)

    def install(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            log.warning("graceful stop: not on the main thread, signals not handled")
            return self
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wake_r = r
        threading.Thread(target=self._watchdog, name="tune-launch-stop-watchdog", daemon=True).start()
        return self

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            name = signal.Signals(signum).name
            if not self.started:
                log.warning("rank %d: %s before the training loop: nothing to checkpoint, exiting", self.rank, name)
                heartbeat.finish("stopped", detail=f"{name} before the training loop")
                _flush()
                self.exit_fn(128 + signum)
                return
            log.warning("rank %d: %s: checkpoint at the end of this step, then exit (grace %.0f s)",
                        self.rank, name, self.grace_s)

    def _watchdog(self) -> None:
        """Sees the signal even when the main thread is stuck in a collective; bounds the stop by the grace period."""
        assert self._wake_r is not None
        while True:
            data = os.read(self._wake_r, 64)
            if not data:
                return
            if any(b in {int(s) for s in STOP_SIGNALS} for b in data):
                break
        time.sleep(self.grace_s)
        print(f"[tune-launch] rank {self.rank}: no clean stop within {self.grace_s:.0f} s of the signal "
              "(blocked in a collective or a long step); exiting, the newest complete checkpoint is kept",
              file=sys.stderr, flush=True)
        heartbeat.finish("stopped", detail="no clean stop within the grace period")
        _flush()
        os._exit(143)

    # ------------------------------------------------------------------ trainer hooks

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True

    def on_step_end(self, args, state, control, **kwargs):
        if _agree(self.signum is not None):
            if not self.stopping:
                log.warning("rank %d: stop requested: saving checkpoint-%d and exiting", self.rank, state.global_step)
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.stopping:
            return control
        name = signal.Signals(self.signum).name if self.signum else "a stop request on another rank"
        if state.is_world_process_zero:
            import json
            from pathlib import Path

            marker = Path(args.output_dir) / STOPPED_MARKER
            marker.write_text(json.dumps({"signal": name, "step": state.global_step,
                                          "checkpoint": f"checkpoint-{state.global_step}"}))
        log.warning("rank %d: checkpoint-%d saved after %s; exiting cleanly (run the same command to resume)",
                    self.rank, state.global_step, name)
        from tune_launch.training.distributed import teardown

        heartbeat.finish("stopped", detail=f"checkpoint-{state.global_step} saved after {name}")
        teardown()
        _flush()
        self.exit_fn(0)
        return control


def install_fail_fast(trainer: Any, rank: int, exit_fn: Callable[[int], None] = os._exit) -> None:
    """An exception in the training loop ends this rank at once, naming it: no barrier or save with peers that
    may be blocked mid-collective (that is how one failing rank used to hang the job until the collective timeout).
    The console gets one line (rank, node, error, log file); the traceback goes to the node's log file."""
    train = trainer.train

    def train_or_exit(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure must end the rank, named
            from tune_launch.training.heartbeats import report_crash

            report_crash(rank, exc, refused=isinstance(exc, TuneLaunchError))
            _flush()
            exit_fn(1)
            raise

    trainer.train = train_or_exit


def install_graceful_stop(trainer: Any, rank: int) -> GracefulStop:
    """Add the callback to a Trainer and install the handlers (call on the main thread, before train())."""
    stop = GracefulStop(rank).install()
    trainer.add_callback(stop)
    return stop
