"""What a user sees from real runs of the embedded default (examples/pretrain-tiny.yaml, shortened by overrides):
the step lines through a pipe, one line per checkpoint, metrics.jsonl against run_report.json, report.png and
`tune-launch report` over two runs, one progress bar under a pseudo-terminal, and the same W&B run id and
TensorBoard folder after a kill and a resume (WANDB_MODE=offline, no network)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT, check_ok, launch, report
from test_progress import BLUE, LOSS_PANEL, ORANGE, colour_pixels

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "pretrain-tiny.yaml"
SHORT = ["train.max_steps=20", "logging.logging_steps=5", "eval.eval_steps=10", "checkpoint.save_steps=10"]
STEP_LINE = re.compile(r"INFO tune_launch: step (\d+)/20  loss \d+\.\d{3}  lr \d\.\de[-+]\d\d  grad \d+\.\d\d  "
                       r"[\d.]+k? tok/s  eta \d+:\d\d:\d\d$")
CHECKPOINT_LINE = re.compile(r"INFO tune_launch: (checkpoint-\d+) saved: [\d.]+ [kMG]?B in \d+\.\d\d s$")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The embedded default twice, output to pipes, at two learning rates."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, lr in (("lr-3e-3", "3e-3"), ("lr-1e-3", "1e-3")):
        out = base / name
        proc = launch(EXAMPLE, f"output_dir={out}", f"optim.learning_rate={lr}", *SHORT)
        check_ok(proc)
        runs[name] = (out, proc)
    return runs


def test_pipe_shows_fixed_format_step_lines_and_one_line_per_checkpoint(two_runs):
    out, proc = two_runs["lr-3e-3"]
    console = proc.stdout + proc.stderr
    assert "{'" not in console, "a Python dict on the console"
    assert "Writing model shards" not in console and "it/s]" not in console
    steps = [int(m.group(1)) for line in proc.stderr.splitlines() if (m := STEP_LINE.search(line))]
    assert steps == [1, 5, 10, 15, 20], proc.stderr[-3000:]
    saved = [m.group(1) for line in proc.stderr.splitlines() if (m := CHECKPOINT_LINE.search(line))]
    assert saved == ["checkpoint-10", "checkpoint-20"]
    assert len(re.findall(r"INFO tune_launch: eval step (0|10|20)/20  loss \d\.\d{3}  ppl ", proc.stderr)) == 3
    node_log = (out / "logs" / "node0.log").read_text()
    assert all(f"step {s}/20  loss" in node_log for s in steps) and "checkpoint-20 saved:" in node_log
    assert f"report: {out.resolve() / 'report.png'}" in proc.stdout


def test_metrics_file_holds_the_run_reports_losses_unrounded(two_runs):
    out, _ = two_runs["lr-3e-3"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    r = report(out)
    assert [[e["step"], e["loss"]] for e in events if e["event"] == "train"] == r["train_losses"]
    assert [[e["step"], e["eval_loss"]] for e in events if e["event"] == "eval"] == r["eval_losses"]
    train = [e for e in events if e["event"] == "train"]
    assert all(e["tokens_per_second"] > 0 and e["learning_rate"] >= 0 and "grad_norm" in e for e in train)
    times = [e["time"] for e in events]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 3600
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"


def test_report_png_is_a_real_picture_and_the_command_overlays_two_runs(two_runs, tmp_path):
    from matplotlib.image import imread

    from tune_launch.training.report_png import SIZE_PX

    out, _ = two_runs["lr-3e-3"]
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (SIZE_PX[1], SIZE_PX[0])
    assert colour_pixels(png, LOSS_PANEL, BLUE) > 100
    both = tmp_path / "both.png"
    done = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "report", str(out), str(two_runs["lr-1e-3"][0]),
                           "-o", str(both)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lr-3e-3: 20 steps" in done.stdout and "lr-1e-3: 20 steps" in done.stdout and "5 of 6 panels with data" in done.stdout  # no GPU memory on CPU
    assert colour_pixels(both, LOSS_PANEL, BLUE) > 100 and colour_pixels(both, LOSS_PANEL, ORANGE) > 100


# --------------------------------------------------------------------------- a terminal

def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal (160 columns) as stdin, stdout and stderr; return its raw output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    code = proc.wait()
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    """What stays on a terminal: each carriage return rewrites the line from its first column."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def test_a_terminal_gets_one_progress_bar_and_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code, raw = run_in_pty([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", str(EXAMPLE), f"output_dir={out}", *SHORT], env)
    screen = screen_lines(raw)
    assert code == 0, "\n".join(screen[-40:])
    bars = [line for line in screen if re.match(r"^step \d+/20 \|", line)]
    assert len(bars) == 1 and bars[0].startswith("step 20/20 |") and "| loss " in bars[0], bars
    assert not [line for line in screen if re.search(r"tune_launch: step \d+/20", line)]  # no scrolling step lines
    assert raw.count("\r") > 10  # the bar was redrawn in place, not printed line by line
    done = screen.index(next(line for line in screen if line.startswith("done: 20 steps")))
    assert screen.index(bars[0]) < done and any(line.startswith("  report: ") for line in screen[done:])
    assert "step 15/20  loss" in (out / "logs" / "node0.log").read_text()  # the file still has every line


# --------------------------------------------------------------------------- trackers across a kill

def test_wandb_offline_and_tensorboard_keep_their_identity_across_a_kill_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    args = [f"output_dir={out}", "train.max_steps=12", "logging.logging_steps=2", "eval.eval_steps=4",
            "checkpoint.save_steps=4", "logging.report_to=[wandb,tensorboard]"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = launch(EXAMPLE, *args, env={**env, "TUNE_LAUNCH_FAULT": "rank=0,at=step,step=6,how=kill"})
    assert killed.returncode != 0 and (out / "checkpoint-4").is_dir() and not (out / "checkpoint-8").exists()
    check_ok(launch(EXAMPLE, *args, env=env))
    assert report(out)["resumed_at_step"] == 4
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1, list((out / "wandb").iterdir())
    saved = json.loads((out / "checkpoint-12" / "tune_launch_trackers.json").read_text())
    assert run_ids == {saved["wandb_run_id"]}
    folders = list((out / "runs").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(folders[0]))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and {2, 4, 6, 10} <= set(steps), steps
