"""report.png: a picture of one run, or of several overlaid (two profiles, two learning rates).

Six panels from output_dir/metrics.jsonl: train and eval loss against step and against tokens, learning
rate, tokens/s, gradient norm, and (on GPU) peak memory per rank. Drawn with matplotlib's Agg canvas
directly (no pyplot, no display, no global backend switch), written atomically. Each run has one colour;
train is a solid line, eval dashed with dots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tune_launch.training.metrics_file import RunMetrics

FIGSIZE_IN = (15.0, 8.4)
DPI = 100
SIZE_PX = (int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI))  # (width, height) of the PNG
PANELS = ("loss by step", "loss by tokens", "learning rate", "tokens/s", "gradient norm", "GPU memory per rank")


def _tick(x: float, _pos: Any = None) -> str:
    """Axis ticks in k/M/G: 5k, 12.5k, 1.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def draw_report(runs: list[RunMetrics], out: Path) -> dict[str, int]:
    """Draw the panels for `runs` into `out` (PNG, SIZE_PX); returns the points plotted per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = dict(zip(PANELS, fig.subplots(2, 3).flat))
    points = {p: 0 for p in PANELS}
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        points["loss by step"] += _plot(axes["loss by step"], run, "train", "loss", "step", colour, f"{run.name} train")
        points["loss by step"] += _plot(axes["loss by step"], run, "eval", "eval_loss", "step", colour, f"{run.name} eval")
        points["loss by tokens"] += _plot(axes["loss by tokens"], run, "train", "loss", "num_input_tokens_seen", colour)
        points["loss by tokens"] += _plot(axes["loss by tokens"], run, "eval", "eval_loss", "num_input_tokens_seen", colour)
        points["learning rate"] += _plot(axes["learning rate"], run, "train", "learning_rate", "step", colour)
        points["tokens/s"] += _plot(axes["tokens/s"], run, "train", "tokens_per_second", "step", colour)
        points["gradient norm"] += _plot(axes["gradient norm"], run, "train", "grad_norm", "step", colour)
        for rank, (steps, gib) in sorted(run.memory_per_rank().items()):
            axes["GPU memory per rank"].plot(steps, gib, color=colour, alpha=1.0 if rank == 0 else 0.5, linewidth=1,
                                             label=f"{run.name} rank {rank}" if len(runs) > 1 or rank < 8 else None)
            points["GPU memory per rank"] += len(steps)
    _label(axes, points)
    axes["loss by tokens"].xaxis.set_major_formatter(FuncFormatter(_tick))
    axes["tokens/s"].yaxis.set_major_formatter(FuncFormatter(_tick))
    fig.suptitle(_title(runs), fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, out)
    return points


def _plot(ax, run: RunMetrics, kind: str, key: str, x: str, colour: str, label: str | None = None) -> int:
    xs, ys = run.series(kind, key, x)
    if not xs:
        return 0
    if kind == "eval":
        ax.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=3, linewidth=1, label=label)
    else:
        ax.plot(xs, ys, color=colour, linewidth=1.3, label=label)
    return len(xs)


def _label(axes: dict[str, Any], points: dict[str, int]) -> None:
    units = {"loss by step": ("step", "loss"), "loss by tokens": ("tokens seen", "loss"),
             "learning rate": ("step", "learning rate"), "tokens/s": ("step", "tokens/s (all ranks)"),
             "gradient norm": ("step", "grad norm (before clipping)"), "GPU memory per rank": ("step", "peak reserved GiB")}
    for name, ax in axes.items():
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(units[name][0])
        ax.set_ylabel(units[name][1])
        ax.grid(True, alpha=0.3)
        if not points[name]:
            why = "no GPU memory in these runs (CPU)" if name == "GPU memory per rank" else "nothing logged"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if points["loss by step"]:
        axes["loss by step"].legend(fontsize=8)
    if points["GPU memory per rank"]:
        axes["GPU memory per rank"].legend(fontsize=7)


def _title(runs: list[RunMetrics]) -> str:
    parts = []
    for run in runs:
        _, train = run.series("train", "loss")
        _, ev = run.series("eval", "eval_loss")
        steps = int(run.train[-1]["step"]) if run.train else 0
        text = f"{run.name}: {steps} steps"
        if train:
            text += f", train loss {train[0]:.3f} -> {train[-1]:.3f}"
        if ev:
            text += f", eval loss {ev[-1]:.3f}"
        parts.append(text)
    return "   |   ".join(parts)


def run_labels(folders: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    parts = [Path(f).resolve().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(f) for f in folders]


def load_runs(folders: list[Path]) -> list[RunMetrics]:
    """Each folder's metrics.jsonl (or, for older runs, run_report.json's losses); OSError/ValueError name the folder."""
    from tune_launch.training.metrics_file import FILE_NAME, from_run_report, read_run

    runs = []
    for folder, label in zip(folders, run_labels(folders)):
        folder = Path(folder)
        if (folder / FILE_NAME).is_file():
            runs.append(read_run(folder, label))
        elif (folder / "run_report.json").is_file():
            runs.append(from_run_report(folder, label))
        else:
            raise FileNotFoundError(f"{folder}: no {FILE_NAME} or run_report.json (not a run's output_dir?)")
    return runs
