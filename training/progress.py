"""What the main process shows while training, and what it keeps for scripts.

One fixed-format line per logging step, for example
`step 80/150  loss 1.103  lr 1.5e-03  grad 0.60  20.1k tok/s  mem 12.3/80.0 GiB  mfu 41%  eta 0:03:12`
(memory and MFU only where a GPU reports them), eval lines in the same style, and every metric, unrounded, as one
JSON object per log event in output_dir/metrics.jsonl (training/metrics_file.py). The lines go through the
`tune_launch` logger, so they are tagged and land in the node's log file; on a terminal the console shows them
as one progress bar instead (training/console.py). The formatting functions are pure.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tune_launch.training import console
from tune_launch.training.metrics_file import MetricsWriter

log = logging.getLogger("tune_launch")
GIB = 1024**3


# --------------------------------------------------------------------------- pure formatting

def human_rate(per_s: float) -> str:
    """20.1k, 1.23M, 850: three significant figures are plenty for a throughput."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            v = per_s / scale
            return f"{v:.0f}{suffix}" if v >= 100 else f"{v:.1f}{suffix}" if v >= 10 else f"{v:.2f}{suffix}"
    return f"{per_s:.0f}"


def human_bytes(n: float) -> str:
    """Decimal units, as `du --si` and file browsers show sizes: 12.4 MB, 1.23 GB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def duration(seconds: float) -> str:
    """h:mm:ss (with days when it is that long)."""
    s = max(0, int(round(seconds)))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def step_line(step: int, max_steps: int, *, loss: float | None, lr: float | None, grad: float | None,
              tokens_per_s: float | None, memory: tuple[float, float] | None = None, mfu: float | None = None,
              eta_s: float | None = None) -> str:
    """The line for one logging step; fields that are not known are left out, the order never changes."""
    fields = [f"step {step}/{max_steps}"]
    if loss is not None:
        fields.append(f"loss {loss:.3f}")
    if lr is not None:
        fields.append(f"lr {lr:.1e}")
    if grad is not None:
        fields.append(f"grad {grad:.2f}" if grad < 100 else f"grad {grad:.3g}")
    if tokens_per_s is not None:
        fields.append(f"{human_rate(tokens_per_s)} tok/s")
    if memory is not None:
        fields.append(f"mem {memory[0] / GIB:.1f}/{memory[1] / GIB:.1f} GiB")
    if mfu is not None:
        fields.append(f"mfu {mfu * 100:.0f}%")
    if eta_s is not None:
        fields.append(f"eta {duration(eta_s)}")
    return "  ".join(fields)


def eval_line(step: int, max_steps: int, *, loss: float | None, seconds: float | None) -> str:
    fields = [f"eval step {step}/{max_steps}"]
    if loss is not None:
        fields.append(f"loss {loss:.3f}")
        if loss < 20:
            fields.append(f"ppl {math.exp(loss):.2f}")
    if seconds is not None:
        fields.append(f"{seconds:.2f} s")
    return "  ".join(fields)


def checkpoint_line(name: str, nbytes: int, seconds: float) -> str:
    return f"{name} saved: {human_bytes(nbytes)} in {seconds:.2f} s"


def _float(logs: dict[str, Any], key: str) -> float | None:
    v = logs.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --------------------------------------------------------------------------- the device side (GPU only)

class DeviceStats:
    """Peak memory per rank since the last log, and the peak FLOP/s for MFU: reported only on a GPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_flops: float | None = None
        if device == "cuda":
            import torch

            from tune_launch.gpus import peak_bf16_flops

            self.peak_flops = peak_bf16_flops(torch.cuda.get_device_name())

    def memory_per_rank(self) -> list[dict[str, float]] | None:
        """[{rank, reserved, allocated, total} in bytes] gathered from every rank (a collective: all ranks call it)."""
        if self.device != "cuda":
            return None
        import torch
        import torch.distributed as dist

        dev = torch.cuda.current_device()
        mine = torch.tensor([torch.cuda.max_memory_reserved(dev), torch.cuda.max_memory_allocated(dev),
                             torch.cuda.get_device_properties(dev).total_memory], dtype=torch.float64, device="cuda")
        torch.cuda.reset_peak_memory_stats(dev)
        rows = [mine]
        if dist.is_available() and dist.is_initialized():
            rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, mine)
        return [{"rank": r, "reserved": float(t[0]), "allocated": float(t[1]), "total": float(t[2])}
                for r, t in enumerate(rows)]


# --------------------------------------------------------------------------- the callback

class MetricsCallback(TrainerCallback):
    """Keeps the losses for the run report; on the main process, prints the step/eval lines (or moves the
    terminal's bar) and appends every log event to metrics.jsonl with rank 0's wall time."""

    def __init__(self, output_dir: str | Path | None = None, device: str = "cpu", world_size: int = 1) -> None:
        self.train_losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.train_seconds = 0.0
        self.world_size = world_size
        self.device_name = device
        self.path = Path(output_dir) / "metrics.jsonl" if output_dir is not None else None
        self._writer: MetricsWriter | None = None
        self._stats: DeviceStats | None = None
        self._params = 0
        self._t0 = 0.0
        self._first_step = 0
        self._last = (0.0, 0)  # (perf_counter, tokens seen) at the previous train log

    # ------------------------------------------------------------------ lifecycle

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t0 = time.perf_counter()
        self._first_step = state.global_step
        self._last = (self._t0, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        self._stats = DeviceStats(self.device_name)
        if model is not None and self._stats.peak_flops:
            from tune_launch.training.model import count_parameters

            self._params = count_parameters(model)[1]
        if state.is_world_process_zero:
            self._write({"event": "start", "step": state.global_step, "max_steps": state.max_steps,
                         "world_size": self.world_size, "device": self.device_name})
            console.start_bar(state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            console.advance(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._t0
        if state.is_world_process_zero:
            console.close_bar()
        if self._writer is not None:
            self._writer.close()
            self._writer = None  # an evaluation after train() reopens it

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._writer is None:
            self._writer = MetricsWriter(self.path)
        self._writer.append(record)

    # ------------------------------------------------------------------ one log event

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        memory = self._stats.memory_per_rank() if self._stats is not None else None  # every rank: a collective
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            self.train_losses.append((step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_losses.append((step, float(logs["eval_loss"])))
        if not state.is_world_process_zero:
            return
        event = "eval" if any(k.startswith("eval_") for k in logs) else ("train" if "loss" in logs else "end")
        record: dict[str, Any] = {"event": event, "step": step, "max_steps": total, **logs}
        if event == "train":
            record.update(self._train_extras(state, memory))
            line = step_line(step, total, loss=_float(logs, "loss"), lr=_float(logs, "learning_rate"),
                             grad=_float(logs, "grad_norm"), tokens_per_s=record.get("tokens_per_second"),
                             memory=(memory[0]["reserved"], memory[0]["total"]) if memory else None,
                             mfu=record.get("mfu"), eta_s=record.get("eta_seconds"))
            log.info("%s", line, extra={"tl_progress": "step", "tl_step": (step, total)})
        elif event == "eval":
            if memory:
                record["memory"] = memory
            log.info("%s", eval_line(step, total, loss=_float(logs, "eval_loss"), seconds=_float(logs, "eval_runtime")),
                     extra={"tl_progress": "event"})
        self._write(record)

    def _train_extras(self, state, memory) -> dict[str, Any]:
        """Throughput over the last logging interval, MFU and memory (GPU), time left at the mean pace so far."""
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        (then, before), self._last = self._last, (now, tokens)
        out: dict[str, Any] = {}
        if now > then and tokens > before:
            out["tokens_per_second"] = (tokens - before) / (now - then)
        done = state.global_step - self._first_step
        if done > 0 and state.max_steps:
            out["eta_seconds"] = (now - self._t0) / done * max(0, state.max_steps - state.global_step)
        if self._stats is not None and "tokens_per_second" in out:
            from tune_launch.gpus import model_flops_utilization

            mfu = model_flops_utilization(self._params, out["tokens_per_second"], self.world_size, self._stats.peak_flops)
            if mfu is not None:
                out["mfu"] = mfu
        if memory:
            out["memory"] = memory
        return out
