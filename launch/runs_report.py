"""`tune-launch report RUN_DIR [RUN_DIR ...]`: the picture of finished (or running) runs, from their metrics.jsonl.

A thin adapter over training/report_png.py, the code that also draws output_dir/report.png at the end of a run.
Several folders overlay their curves (two profiles, two learning rates) in one picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tune_launch.errors import TuneLaunchError

EPILOG = """examples:
  tune-launch report outputs/pretrain-tiny                       -> outputs/pretrain-tiny/report.png
  tune-launch report outputs/lr-1e-3 outputs/lr-3e-3 -o lr.png   -> both runs' curves in lr.png
works while a run is still going (it reads what has been logged so far)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.epilog = EPILOG
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="PNG to write (default: RUN_DIR/report.png for one run, ./report-compare.png for several)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def default_output(runs: list[Path]) -> Path:
    return runs[0] / "report.png" if len(runs) == 1 else Path("report-compare.png")


def run_from_args(args: argparse.Namespace) -> int:
    from tune_launch.training.report_png import draw_report, load_runs

    out = args.output or default_output(args.runs)
    if out.suffix.lower() != ".png":
        raise TuneLaunchError(f"--output {out}: the picture is a PNG; give a file name ending in .png")
    try:
        runs = load_runs(args.runs)
    except FileNotFoundError as e:
        raise TuneLaunchError(f"{e}; pass the folder a run wrote checkpoints into") from None
    except (OSError, ValueError) as e:
        raise TuneLaunchError(f"cannot read the run's metrics: {e}") from None
    empty = [r.name for r in runs if not r.train and not r.eval]
    if len(empty) == len(runs):
        raise TuneLaunchError(f"{', '.join(empty)}: no step logged yet; run `tune-launch report` again after the first logging step")
    try:
        points = draw_report(runs, out)
    except OSError as e:
        raise TuneLaunchError(f"--output {out}: cannot write the picture ({e.strerror or e})") from None
    for r in runs:
        steps = int(r.train[-1]["step"]) if r.train else 0
        _, losses = r.series("train", "loss")
        _, evals = r.series("eval", "eval_loss")
        loss = f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no train loss"
        ev = f", eval loss {evals[-1]:.3f}" if evals else ""
        print(f"{r.name}: {steps} steps, {loss}{ev}")
    drawn = sum(1 for n in points.values() if n)
    print(f"report: {out.resolve()} ({len(runs)} run(s), {drawn} of {len(points)} panels with data)")
    return 0
