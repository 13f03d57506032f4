"""`tune-launch status`: the pure description of a run from its heartbeats, and the CLI's refusal of a non-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tune_launch.heartbeat import Heartbeat
from tune_launch.launch.status import describe_run, format_status

ROOT = Path(__file__).resolve().parent.parent
NOW = 10_000.0


def beat(rank: int, **kw) -> Heartbeat:
    base = dict(rank=rank, node=rank // 2, world_size=4, pid=50 + rank, host="n1", attempt="x", started=NOW - 600,
                phase="train", step=36, max_steps=400, step_s=0.25, loss=1.234, loss_step=36, tokens_per_s=8643.2,
                time=NOW - 0.4, progress_time=NOW - 0.4)
    return Heartbeat(**{**base, **kw})


def test_a_live_run_phase_loss_speed_time_left_and_every_rank():
    beats = {r: beat(r) for r in range(4)}
    beats[3] = beat(3, node=1, time=NOW - 42, progress_time=NOW - 42)
    d = describe_run(Path("/runs/a"), beats, None, None, "checkpoint-36", NOW)
    assert (d["state"], d["phase"], d["step"], d["loss"], d["checkpoint"]) == ("running", "train step 37/400", 36, 1.234, "checkpoint-36")
    assert d["seconds_left"] == (400 - 36) * 0.25
    assert [round(r["heartbeat_age_s"], 1) for r in d["ranks"]] == [0.4, 0.4, 0.4, 42.0]
    text = format_status(d)
    assert "time left  0:01:31 (364 steps x 0.25 s)" in text and "tokens/s   8,643" in text
    assert "rank 3 node 1 n1 pid 53: train step 37/400; heartbeat 42.0 s ago, progress 42.0 s ago" in text


def test_finished_failed_stalled_and_silent_runs_are_told_apart():
    done = {r: beat(r, phase="done") for r in range(4)}
    report = {"steps": 400, "tokens_per_second": 8000.0, "wall_seconds": 120.0, "final_model": "/runs/a/final"}
    assert describe_run(Path("/r"), done, None, report, None, NOW)["report"]["steps"] == 400
    failed = {**done, 2: beat(2, phase="failed", error="RuntimeError: boom")}
    d = describe_run(Path("/r"), failed, None, None, None, NOW)
    assert d["state"] == "failed" and d["ranks"][2]["error"] == "RuntimeError: boom"
    stall = {"time": NOW - 5, "lines": ["tune-launch: error: rank 1 (node 0) stalled in train step 37/400: ..."]}
    d = describe_run(Path("/r"), {r: beat(r) for r in range(4)}, stall, None, None, NOW)
    assert d["state"].startswith("stalled") and d["stall"] == stall["lines"]
    old_stall = {"time": NOW - 10_000, "lines": ["from an earlier launch"]}
    assert describe_run(Path("/r"), {r: beat(r) for r in range(4)}, old_stall, None, None, NOW)["state"] == "running"
    silent = {r: beat(r, time=NOW - 3600) for r in range(4)}
    assert describe_run(Path("/r"), silent, None, None, None, NOW)["state"] == "not running? (no heartbeat for 1:00:00)"
    gone = describe_run(Path("/r"), {r: beat(r) for r in range(4)}, None, None, None, NOW, alive={1: False})
    assert gone["state"] == "not running (its processes are gone)"


def test_only_the_newest_launchs_ranks_are_shown():
    beats = {r: beat(r, world_size=2, attempt="new") for r in range(2)}
    beats.update({r: beat(r, world_size=4, attempt="old", started=NOW - 90_000) for r in (2, 3)})
    assert [r["rank"] for r in describe_run(Path("/r"), beats, None, None, None, NOW)["ranks"]] == [0, 1]


def test_status_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "status", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"tune-launch: error: {tmp_path}: no heartbeats in {tmp_path}/heartbeat: not a "
                                   "tune-launch run folder, or the run has not started yet")
