"""output_dir/metrics.jsonl: every log event of a run, one JSON object per line, appended across resumes.

Each object has `event` (start | train | eval | end), `step`, `time` (rank 0's wall clock, Unix seconds) and the
Trainer's metrics unrounded (`loss`, `learning_rate`, `grad_norm`, `num_input_tokens_seen`, `eval_loss`, ...),
plus what tune-launch derives: `tokens_per_second` over the logging interval, `eta_seconds`, and on a GPU `mfu`
and `memory` (per rank: reserved, allocated and total bytes). A `start` event opens every (re)start; its step
is where that part resumed. The file is never rewritten: a run killed at step 73 and resumed from checkpoint-50
logs steps 51-73 twice, and `read_run` keeps the later ones (also for an event logged twice at one step). A line
cut short by a kill is skipped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "metrics.jsonl"


class MetricsWriter:
    """Appends one line per event and flushes it at once (a crash loses at most the line being written)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({"time": time.time(), **record}, default=_jsonable) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _jsonable(value: Any) -> Any:
    try:
        return float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)


@dataclass
class RunMetrics:
    """One run folder's events after resumes are resolved, in step order within each kind."""

    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    def series(self, kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(xs, ys) of `key` in the `kind` events that carry both, finite values only."""
        xs, ys = [], []
        for r in getattr(self, kind):
            xv, yv = r.get(x), r.get(key)
            if _finite(xv) and _finite(yv):
                xs.append(float(xv))
                ys.append(float(yv))
        return xs, ys

    def memory_per_rank(self) -> dict[int, tuple[list[float], list[float]]]:
        """rank -> (steps, peak reserved GiB) from the train events that carry GPU memory."""
        out: dict[int, tuple[list[float], list[float]]] = {}
        for r in self.train:
            for m in r.get("memory") or ():
                steps, gib = out.setdefault(int(m["rank"]), ([], []))
                steps.append(float(r["step"]))
                gib.append(float(m["reserved"]) / 1024**3)
        return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_events(lines: list[str], name: str = "run") -> RunMetrics:
    """Resolve resumes: a start at step S drops the earlier train/eval events past S (they were redone)."""
    run = RunMetrics(name)
    for text in lines:
        try:
            r = json.loads(text)
        except ValueError:
            continue  # the line a kill cut short
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            continue
        kind = r.get("event")
        if kind == "start":
            s = r["step"]
            run.train = [e for e in run.train if e["step"] <= s]
            run.eval = [e for e in run.eval if e["step"] <= s]
            run.starts.append(r)
            run.end = None
        elif kind in ("train", "eval"):
            events = getattr(run, kind)
            if events and events[-1]["step"] == r["step"]:
                events[-1] = r  # the same step again (an eval_on_start after a resume): the later one counts
            else:
                events.append(r)
        elif kind == "end":
            run.end = r
    return run


def read_run(folder: Path, name: str | None = None) -> RunMetrics:
    """The metrics of a run folder (raises OSError when it has no metrics.jsonl)."""
    text = (Path(folder) / FILE_NAME).read_text(encoding="utf-8", errors="replace")
    return parse_events(text.splitlines(), name or Path(folder).name)


def from_run_report(folder: Path, name: str | None = None) -> RunMetrics:
    """Losses by step from run_report.json, for run folders written before metrics.jsonl existed."""
    data = json.loads((Path(folder) / "run_report.json").read_text())
    run = RunMetrics(name or Path(folder).name)
    run.train = [{"step": int(s), "loss": float(v)} for s, v in data.get("train_losses") or []]
    run.eval = [{"step": int(s), "eval_loss": float(v)} for s, v in data.get("eval_losses") or []]
    return run
