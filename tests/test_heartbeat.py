"""The heartbeat file: what a rank's writer puts in it, when, and what readers make of it (real threads, real files)."""

from __future__ import annotations

import json
import time

import pytest

from tune_launch import heartbeat
from tune_launch.heartbeat import Heartbeat, HeartbeatWriter


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_reports_reach_the_file_progress_and_life_counted_apart(tmp_path):
    path = heartbeat.rank_file(tmp_path, 3)
    w = HeartbeatWriter(path, {"rank": 3, "node": 1, "pid": 7}, interval_s=0.05, pulse_s=0.2).start()
    try:
        first = heartbeat.read(path)
        assert (first.rank, first.node, first.phase, first.progress) == (3, 1, "starting", 0)
        w.update(phase="data", done=10, total=100, detail="tokenizing")
        b = wait_for(lambda: (b := heartbeat.read(path)) and b.phase == "data" and b)
        assert (b.done, b.total, b.where, b.progress) == (10, 100, "data 10/100 tokenizing", 1)
        progress, writes = b.progress, b.writes
        time.sleep(0.7)  # nothing reported: pulses only
        idle = heartbeat.read(path)
        assert idle.progress == progress and idle.writes >= writes + 2
    finally:
        w.close(phase="done")
    assert heartbeat.read(path).phase == "done"


def test_a_burst_of_reports_is_written_a_few_times_not_each_time(tmp_path):
    path = tmp_path / "rank0.json"
    w = HeartbeatWriter(path, {"rank": 0}, interval_s=0.1, pulse_s=60).start()
    start = time.monotonic()
    for step in range(20000):
        w.update(phase="train", step=step)
    time.sleep(0.35)
    elapsed = time.monotonic() - start
    w.close()
    b = heartbeat.read(path)
    assert b.step == 19999 and b.progress == 20000
    assert b.writes <= elapsed / 0.1 + 3, b.writes  # bounded by time, not by the number of reports


def test_a_phase_change_resets_the_phase_counters():
    w = HeartbeatWriter(__import__("pathlib").Path("/nonexistent/dir/rank0.json"), {"rank": 0})
    w.update(phase="data", done=5, total=9, detail="x")
    w.update(phase="model_load")
    assert (w.get("done"), w.get("total"), w.get("detail")) == (0, 0, "")
    w.flush()  # an unwritable folder never raises in the rank


def test_module_calls_are_no_ops_without_a_writer(monkeypatch):
    monkeypatch.setattr(heartbeat, "_writer", None)
    heartbeat.report_progress("data", 1, 2)
    heartbeat.report_phase("save")
    heartbeat.finish("done")


def test_readers_tolerate_partial_files_and_foreign_keys(tmp_path):
    p = tmp_path / "rank0.json"
    p.write_text('{"rank": 0, "phase": "tra')
    assert heartbeat.read(p) is None
    p.write_text(json.dumps({"rank": 2, "phase": "save", "detail": "checkpoint-8", "step": "eight", "new_field": 1}))
    b = heartbeat.read(p)
    assert (b.rank, b.phase, b.step, b.where) == (2, "save", 0, "save checkpoint-8")


@pytest.mark.parametrize("fields,where", [
    ({"phase": "train", "step": 36, "max_steps": 400}, "train step 37/400"),
    ({"phase": "eval", "done": 3, "step": 36}, "eval 3 after step 36"),
    ({"phase": "model_load", "detail": "resuming from checkpoint-36"}, "model load resuming from checkpoint-36"),
])
def test_where_a_rank_is_in_words(fields, where):
    assert Heartbeat(**fields).where == where


def test_read_run_finds_every_rank(tmp_path):
    for r in (0, 1, 5):
        heartbeat.folder(tmp_path).mkdir(exist_ok=True)
        heartbeat.write_json(heartbeat.rank_file(tmp_path, r), {"rank": r, "phase": "train"})
    (heartbeat.folder(tmp_path) / "rank9.json.tmp123").write_text("{")
    assert sorted(heartbeat.read_run(tmp_path)) == [0, 1, 5]
    assert sorted(heartbeat.read_run(tmp_path, range(2))) == [0, 1]


def test_a_new_phase_and_a_change_the_thread_left_unwritten_are_written_by_the_reporter(tmp_path):
    """The limits depend on the phase: it must never be a stale one, even when the writer thread is starved."""
    path = tmp_path / "rank0.json"
    w = HeartbeatWriter(path, {"rank": 0}, interval_s=3600, pulse_s=3600)  # a thread that never gets to run
    w.flush()
    w.update(phase="save", detail="checkpoint-8")
    assert heartbeat.read(path).where == "save checkpoint-8"  # at once
    w.update(phase="save", done=1)
    assert heartbeat.read(path).done == 0  # a step within the phase: left to the thread ...
    w._last_write -= w.lag_s + 0.1
    w.update(phase="save", done=2)
    assert heartbeat.read(path).done == 2  # ... unless it has not written for lag_s (LAG_S, or 4 intervals)


def test_the_trainer_hooks_report_steps_saves_evaluations_and_the_final_consolidation(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tune_launch.training.heartbeat_callback import install_heartbeat

    writer = HeartbeatWriter(tmp_path / "rank0.json", {"rank": 0}, interval_s=3600, pulse_s=3600)
    monkeypatch.setattr(heartbeat, "_writer", writer)
    seen = []

    class FakeTrainer:
        state = SimpleNamespace(global_step=0, max_steps=10, num_input_tokens_seen=0)

        def add_callback(self, cb):
            self.cb = cb

        def save_model(self, *a):
            seen.append(("save_model", writer.get("phase"), writer.get("detail")))

        def _save_checkpoint(self, *a):
            seen.append(("checkpoint", writer.get("phase"), writer.get("detail")))
            self.save_model()

        def evaluate(self):
            self.cb.on_prediction_step(None, self.state, None)
            seen.append(("eval", writer.get("phase"), writer.get("done")))

    t = FakeTrainer()
    cb = install_heartbeat(t)
    cb.on_train_begin(None, t.state, None)
    for step in (1, 2, 3, 4):
        t.state.global_step, t.state.num_input_tokens_seen = step, 100 * step
        cb.on_step_end(None, t.state, None)
    assert (writer.get("phase"), writer.get("step"), writer.get("steps_timed")) == ("train", 4, 4)
    assert writer.get("step_s") > 0 and writer.get("tokens_per_s") > 0
    t._save_checkpoint(None, None)
    t.evaluate()
    assert writer.get("phase") == "train"  # back to training after each
    cb.on_train_end(None, t.state, None)
    t.save_model()
    assert seen == [("checkpoint", "save", "checkpoint-4"), ("save_model", "save", "checkpoint-4"), ("eval", "eval", 1),
                    ("save_model", "consolidate", "final model")]


def test_busy_work_counts_as_progress_and_idle_waiting_does_not(tmp_path, monkeypatch):
    """A preparation step inside a library that reports nothing (TRL's SFT preparation, a download): CPU used by
    the process is progress; a preparer that sits idle (stuck) shows none (real thread, real CPU accounting)."""
    from tune_launch.training.prepare_progress import BusyProgress

    monkeypatch.setattr(heartbeat, "_writer", None)
    path = heartbeat.rank_file(tmp_path, 0)
    writer = heartbeat.start(path, {"rank": 0}, interval_s=0.02)
    try:
        writer.update(phase="data", done=5, total=10, detail="preparing")
        with BusyProgress(every_s=0.1, min_cpu_share=0.3) as busy:
            deadline = time.monotonic() + 20
            while busy.reports < 3 and time.monotonic() < deadline:  # busy: CPU in every window
                sum(i * i for i in range(1000))
            worked = busy.reports
            time.sleep(0.25)  # the window the busy loop ended in may still count
            before_idle = busy.reports
            time.sleep(1.0)  # idle: about 10 windows, none counts
            idle = busy.reports - before_idle
        assert worked >= 3 and idle == 0, (worked, idle)
        writer.flush()
        b = heartbeat.read(path)
        assert (b.phase, b.done, b.total, b.detail) == ("data", 5, 10, "preparing")  # the phase's figures kept
        assert b.progress >= 1 + worked
    finally:
        writer.close(phase="done")


def test_busy_progress_does_nothing_without_a_heartbeat(monkeypatch):
    from tune_launch.training.prepare_progress import BusyProgress

    monkeypatch.setattr(heartbeat, "_writer", None)
    with BusyProgress(every_s=0.01) as busy:
        time.sleep(0.05)
    assert busy.reports == 0 and not busy._thread.is_alive()
