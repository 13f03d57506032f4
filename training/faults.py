"""Fault injection for the reliability tests, driven by one environment variable; inert when it is unset.

    TUNE_LAUNCH_FAULT="rank=1,at=forward,step=3,how=kill"

at:  data (while the batch is collated), forward (in the model's forward), collective (this rank starts an
     all-reduce its peers never join, then fails inside it), save (between the model and optimizer files of
     the first checkpoint at or after `step`), step (at the end of optimizer step `step`, after any save),
     prepare (when the data phase begins; `step` is seconds for slow).
how: kill (SIGKILL itself), raise (RuntimeError), exit (os._exit(3)), stop (SIGSTOP itself: a hung node),
     sleep (sleep forever: a rank stuck without dying, whose Python stack can still be dumped),
     slow (prepare only: `step` seconds of slow but reported progress, then go on).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tune_launch")
FAULT_ENV = "TUNE_LAUNCH_FAULT"
POINTS = ("data", "forward", "collective", "save", "step", "prepare")
HOWS = ("kill", "raise", "exit", "stop", "sleep", "slow")


class FaultSpecError(ValueError):
    """A malformed TUNE_LAUNCH_FAULT value (tests only)."""


class InjectedFault(RuntimeError):
    """The error a `how=raise` fault raises."""


@dataclass(frozen=True)
class FaultSpec:
    rank: int
    at: str
    step: int
    how: str

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise FaultSpecError(f"{FAULT_ENV}: '{part}' is not key=value")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"rank", "at", "step", "how"}
        if unknown:
            raise FaultSpecError(f"{FAULT_ENV}: unknown keys {sorted(unknown)}")
        at, how = fields.get("at", "forward"), fields.get("how", "kill")
        if at not in POINTS or how not in HOWS:
            raise FaultSpecError(f"{FAULT_ENV}: at must be one of {POINTS}, how one of {HOWS}")
        if (how == "slow") != (at == "prepare"):
            raise FaultSpecError(f"{FAULT_ENV}: how=slow goes with at=prepare (and only there)")
        try:
            return cls(rank=int(fields.get("rank", "0")), at=at, step=int(fields.get("step", "1")), how=how)
        except ValueError:
            raise FaultSpecError(f"{FAULT_ENV}: rank and step must be integers") from None


def from_environ(env: Any = None) -> FaultSpec | None:
    text = (os.environ if env is None else env).get(FAULT_ENV, "").strip()
    return FaultSpec.parse(text) if text else None


def fire(spec: FaultSpec, where: str) -> None:
    """Fail now, the way the spec says."""
    log.warning("%s: injecting '%s' at %s (rank %d, step %d)", FAULT_ENV, spec.how, where, spec.rank, spec.step)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    from tune_launch import heartbeat

    heartbeat.flush()  # the heartbeat shows where the fault hit, even when the process freezes right after
    if spec.how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif spec.how == "exit":
        os._exit(3)
    elif spec.how == "sleep":
        sleep_forever()
    else:
        raise InjectedFault(f"injected fault at {where} (rank {spec.rank}, step {spec.step})")


def sleep_forever() -> None:
    """A rank that hangs without dying: its threads (heartbeat pulse, stop watchdog) keep running."""
    while True:
        time.sleep(3600)


def slow_preparation(seconds: int) -> None:
    """A data phase that takes `seconds` but reports its progress every second (it must not count as a stall)."""
    from tune_launch.heartbeat import report_progress

    for done in range(seconds):
        report_progress("data", done, seconds, detail="slow preparation (test fault)")
        time.sleep(1.0)
    report_progress("data", seconds, seconds)


def at_phase(phase: str, env: Any = None) -> None:
    """Called where a phase of the run begins: fires an `at=prepare` fault aimed at this rank."""
    spec = from_environ(env)
    if spec is None or spec.at != "prepare" or phase != "data":
        return
    from tune_launch.training.distributed import RankInfo

    if RankInfo.from_environ(env).rank != spec.rank:
        return
    log.warning("%s: '%s' at the start of the data phase (rank %d, %d)", FAULT_ENV, spec.how, spec.rank, spec.step)
    slow_preparation(spec.step) if spec.how == "slow" else fire(spec, "data preparation")


def _collective(spec: FaultSpec) -> None:
    """Start an all-reduce no peer joins, then fail while it is pending: peers block in their next collective."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.ones(1)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, async_op=True)
    fire(spec, "collective")


def install_faults(trainer: Any, rank: int, env: Any = None) -> FaultSpec | None:
    """Arm the fault on the rank it names; returns the spec (None when unset or for another rank)."""
    spec = from_environ(env)
    if spec is None or spec.rank != rank or spec.at == "prepare":
        return None
    state = {"batches": 0, "forwards": 0}
    if spec.at == "data":
        collate = trainer.data_collator

        def faulty_collate(features):
            state["batches"] += 1
            if state["batches"] == spec.step:
                fire(spec, "data loading")
            return collate(features)

        trainer.data_collator = faulty_collate
    elif spec.at in ("forward", "collective"):
        model = trainer.model

        def pre_forward(module, args, kwargs=None):
            if module.training:
                state["forwards"] += 1
                if state["forwards"] == spec.step:
                    _collective(spec) if spec.at == "collective" else fire(spec, "forward")

        model.register_forward_pre_hook(pre_forward)
    elif spec.at == "save":
        original = trainer._save_optimizer_and_scheduler

        def faulty_save(output_dir):
            if trainer.state.global_step >= spec.step:
                fire(spec, f"save of step {trainer.state.global_step} ({output_dir})")
            return original(output_dir)

        trainer._save_optimizer_and_scheduler = faulty_save
    elif spec.at == "step":
        from transformers import TrainerCallback

        class FaultAtStepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == spec.step:
                    fire(spec, f"the end of step {spec.step}")

        trainer.add_callback(FaultAtStepEnd())
    log.warning("%s armed: %s", FAULT_ENV, spec)
    return spec
