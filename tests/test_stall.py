"""Stall detection as pure functions: fake heartbeats and times in, limits, stalls, culprits and lines out; the
stack parsers on real faulthandler and py-spy output; the Watch's decisions on heartbeats."""

from __future__ import annotations

import json
import signal

import pytest

from tune_launch.heartbeat import Heartbeat
from tune_launch.launch.stacks import Frame, RankStack, parse_faulthandler, parse_py_spy_json, short_path, summarize, StackTarget
from tune_launch.launch.stall import Limits, StallTracker, culprits, phase_limit, stall_lines
from tune_launch.launch.supervision import CaptureStacks, KillEverything, RankOutput, Say, SignalRanks, Watch, verdict
from tune_launch.protocol import EXIT_STALLED

LIMITS = Limits(train_step_s=60, step_factor=10, timed_steps=3, first_steps_s=900,
                phases={"starting": 600, "data": 1800, "model_load": 3600, "eval": 900, "save": 1800, "consolidate": 3600})


def beat(rank: int, progress: int, phase: str = "train", step: int = 5, writes: int | None = None, **kw) -> Heartbeat:
    return Heartbeat(rank=rank, node=kw.pop("node", 0), pid=100 + rank, attempt="a", phase=phase, step=step,
                     progress=progress, writes=progress if writes is None else writes, **kw)


# --------------------------------------------------------------------------- limits derived from the run

def test_the_step_limit_is_the_floor_until_ten_median_steps_exceed_it():
    assert phase_limit(beat(0, 1, steps_timed=10, step_s=0.5), LIMITS)[0] == 60
    assert phase_limit(beat(0, 1, steps_timed=10, step_s=12.0), LIMITS) == (120.0, "a training step: 10 x the median step of 12.00 s")
    # before a few steps are timed (compilation, first collectives): the first-steps limit
    assert phase_limit(beat(0, 1, steps_timed=2, step_s=12.0), LIMITS) == (900, "the first training steps")


@pytest.mark.parametrize("phase,limit", [("data", 1800), ("model_load", 3600), ("eval", 900), ("save", 1800),
                                         ("consolidate", 3600), ("starting", 600), ("done", 600)])
def test_every_other_phase_has_its_own_limit(phase, limit):
    assert phase_limit(beat(0, 1, phase=phase), LIMITS)[0] == limit
    assert phase_limit(None, LIMITS) == (600, "starting, no heartbeat yet")


def test_limits_come_from_the_yaml_section():
    from tune_launch.training.schema import WatchdogConfig

    lim = Limits.from_config(WatchdogConfig(train_step_s=5, save_s=7, data_s=3))
    assert (lim.train_step_s, lim.phases["save"], lim.phases["data"], lim.phases["eval"]) == (5, 7, 3, 900)


# --------------------------------------------------------------------------- the tracker

def tracker(ranks=(0, 1)) -> StallTracker:
    return StallTracker(LIMITS, ranks, {r: 0 for r in ranks}, started_at=0.0)


def test_a_job_stalls_when_no_rank_made_progress_for_its_limit():
    t = tracker()
    t.observe(10.0, {0: beat(0, 5, steps_timed=9, step_s=0.2), 1: beat(1, 5, steps_timed=9, step_s=0.2)})
    assert t.check(70.0) is None  # 60 s, not more
    stall = t.check(70.5)
    assert stall is not None and [r.rank for r in stall.ranks] == [0, 1]
    assert stall.idle_s == pytest.approx(60.5) and stall.binding.limit_s == 60


def test_a_rank_that_progresses_keeps_the_job_alive_while_the_others_wait():
    """Rank 0 tokenizes slowly (its data counter moves), rank 1 waits in a barrier: no stall however long."""
    t = tracker()
    for second in range(0, 4000, 30):
        t.observe(float(second), {0: beat(0, second, phase="data", step=0), 1: beat(1, 1, phase="data", step=0)})
        assert t.check(second + 1.0) is None
    assert t.check(4000 + 1801.0) is not None  # rank 0 stopped reporting too: now the data limit runs out


def test_writes_without_progress_are_life_not_progress():
    t = tracker((0,))
    for second in range(0, 70, 5):  # the 5 s pulse keeps coming; the step does not move
        t.observe(float(second), {0: beat(0, 7, writes=second, steps_timed=9, step_s=0.2)})
    stall = t.check(61.0)
    assert stall is not None and stall.ranks[0].silent_s < 5 and not stall.ranks[0].frozen


def test_a_frozen_rank_stops_writing_and_an_unseen_rank_counts_as_starting():
    t = StallTracker(LIMITS, (0, 1, 2), {0: 0, 1: 0, 2: 1}, started_at=0.0)
    t.observe(1.0, {0: beat(0, 3), 1: beat(1, 3)})
    snap = t.snapshot(700.0)
    assert [r.frozen for r in snap.ranks] == [True, True, True]  # nothing written for 699 s, rank 2 never seen
    assert snap.ranks[2].where == "starting" and snap.ranks[2].node == 1 and not snap.ranks[2].seen


# --------------------------------------------------------------------------- culprits and the verdict

def stack(rank: int, frames: list[tuple[str, str]], state: str = "sleeping") -> RankStack:
    return RankStack(rank, 100 + rank, state, tuple(Frame(f, 10, fn) for f, fn in frames), ("faulthandler",))


SLEEPER = [("/x/tune_launch/training/faults.py", "sleep_forever"), ("/x/tune_launch/training/faults.py", "fire")]
BACKWARD = [("/v/site-packages/torch/autograd/graph.py", "_engine_run_backward"), ("/v/site-packages/torch/_tensor.py", "backward")]
BARRIER = [("/v/site-packages/torch/distributed/c10d_logger.py", "wrapper"),
           ("/v/site-packages/torch/distributed/distributed_c10d.py", "barrier")]


def stalled(n: int = 2, **kw):
    t = tracker(tuple(range(n)))
    t.observe(0.0, {r: beat(r, 1, **kw) for r in range(n)})
    return t.check(1000.0)


def test_the_rank_not_waiting_in_a_collective_is_the_culprit():
    s = stalled()
    assert culprits(s, {0: stack(0, BACKWARD), 1: stack(1, SLEEPER)}) == [1]
    assert culprits(s, {0: stack(0, SLEEPER), 1: stack(1, BARRIER)}) == [0]


def test_a_stopped_or_silent_rank_is_the_culprit_before_any_stack_is_read():
    s = stalled()
    assert culprits(s, {0: stack(0, BACKWARD), 1: stack(1, SLEEPER, state="stopped (SIGSTOP)")}) == [1]
    assert culprits(s, {0: stack(0, BACKWARD)}) == [1]  # rank 1 gave no stack and wrote nothing for 1000 s
    assert culprits(s, {0: stack(0, BACKWARD), 1: stack(1, BARRIER)}) == []  # both wait: the stacks must tell


def test_stall_lines_name_rank_node_phase_step_the_others_and_the_checkpoint():
    s = stalled(max_steps=40, steps_timed=9, step_s=0.2)
    lines = stall_lines(s, {0: stack(0, BACKWARD), 1: stack(1, SLEEPER)}, "/o/logs/stall.txt", "checkpoint-4", False)
    assert lines[0] == "[tune-launch] stall: no rank made progress for 1000 s (limit 60 s for a training step: at least 60 s (10 x the median step of 0.20 s is less))"
    assert lines[1].startswith("[tune-launch]   * rank 1 (node 0, pid 101): train step 6/40, no progress for 1000 s: in sleep_forever (tune_launch/training/faults.py:10)")
    assert "rank 0 (node 0, pid 100): train step 6/40" in lines[2] and "waits in _engine_run_backward (torch/autograd/graph.py:10)" in lines[2]
    assert lines[3] == "[tune-launch] stacks of every rank: /o/logs/stall.txt"
    assert lines[-1].startswith("tune-launch: error: rank 1 (node 0) stalled in train step 6/40: in sleep_forever")
    assert "1 other rank(s) wait for it" in lines[-1] and "checkpoint-4, is kept" in lines[-1]
    assert sum(line.startswith("tune-launch: error:") for line in lines) == 1
    waits = stall_lines(s, {0: stack(0, BARRIER), 1: stack(1, BARRIER)}, None, None, True)
    assert "every rank stalled in train step 6/40" in waits[-1] and "requeueing" in waits[-1]
    assert "barrier (torch/distributed/distributed_c10d.py:10)" in waits[1]  # the logger's wrapper frame skipped


# --------------------------------------------------------------------------- parsing real dumps

FAULTHANDLER = """Thread 0x00007f82d631d6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f82d6ea9b80 (most recent call first):
  File "/work/checkout/training/faults.py", line 90 in sleep_forever
  File "/work/checkout/training/faults.py", line 82 in fire
  File "/v/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1821 in inner
"""


def test_faulthandler_dump_parses_into_threads_innermost_first():
    threads = parse_faulthandler(FAULTHANDLER)
    assert [(hex(t.ident), t.current, len(t.frames)) for t in threads] == [("0x7f82d631d6c0", False, 2), ("0x7f82d6ea9b80", True, 3)]
    assert threads[1].frames[0] == Frame("/work/checkout/training/faults.py", 90, "sleep_forever")
    s = summarize(StackTarget(1, 42, main_thread=0x7F82D6EA9B80), "sleeping", FAULTHANDLER, "")
    assert s.main[0].func == "sleep_forever" and s.sources == ("faulthandler",) and s.waiting is False
    assert s.text.splitlines()[1] == "  main thread 0x7f82d6ea9b80:"  # the main thread first in the report


def test_py_spy_json_parses_and_wins_for_the_report():
    dump = json.dumps([{"thread_id": 7, "thread_name": "MainThread", "frames": [
        {"name": "barrier", "filename": "/v/site-packages/torch/distributed/distributed_c10d.py", "line": 5356}]}])
    assert parse_py_spy_json(dump)[0].frames == (Frame("/v/site-packages/torch/distributed/distributed_c10d.py", 5356, "barrier"),)
    assert parse_py_spy_json("Error: Failed to suspend process") == []
    s = summarize(StackTarget(0, 42, main_thread=7), "stopped (SIGSTOP)", "", dump)
    assert s.stopped and s.waiting and s.where() == "process stopped (SIGSTOP), at barrier (torch/distributed/distributed_c10d.py:5356)"


@pytest.mark.parametrize("name", ["DistributedDataParallel._distributed_broadcast_coalesced", "_sync_module_buffers"])
def test_ddp_buffer_broadcast_before_a_forward_is_waiting_for_the_peers(name):
    """Seen on the dev cluster: with node 1 frozen, node 0's rank sat in DDP's buffer broadcast (py-spy names it
    Class.method, faulthandler only the method); it waits on its peers, it is not the culprit."""
    ddp = "/v/lib/python3.11/site-packages/torch/nn/parallel/distributed.py"
    dump = json.dumps([{"thread_id": 7, "thread_name": "MainThread", "frames": [
        {"name": name, "filename": ddp, "line": 2363},
        {"name": "DistributedDataParallel.forward", "filename": ddp, "line": 1886}]}])
    s = summarize(StackTarget(0, 42, main_thread=7), "sleeping", "", dump)
    assert s.waiting and s.where().startswith(f"waits in {name} (torch/nn/parallel/distributed.py:2363)")
    busy = json.dumps([{"thread_id": 7, "thread_name": "MainThread", "frames": [
        {"name": "DistributedDataParallel.forward", "filename": ddp, "line": 1886}]}])
    assert summarize(StackTarget(0, 42, main_thread=7), "running", "", busy).waiting is False


def test_frames_are_shown_as_readers_know_the_files():
    assert short_path("/v/lib/python3.11/site-packages/torch/autograd/graph.py") == "torch/autograd/graph.py"
    assert short_path("/usr/lib/python3.11/threading.py") == "threading.py"


# --------------------------------------------------------------------------- the watch acts on heartbeats

def ticks(w: Watch, start: float, end: float, every: float = 5.0) -> list:
    """The loop's ticks from start to end (the launcher ticks often; a long gap means it was itself stopped)."""
    t, actions = start, []
    while t < end:
        actions = w.tick(t, {0: True, 1: True}, None)
        assert actions == [], (t, actions)
        t += every
    return w.tick(end, {0: True, 1: True}, None)


def test_the_watch_captures_every_stack_then_kills_on_a_stall_and_the_verdict_exits_124():
    t = tracker()
    w = Watch(grace_s=120, stalls=t)
    assert w.tick(1.0, {0: True, 1: True}, {0: beat(0, 1, steps_timed=9, step_s=0.1), 1: beat(1, 1, steps_timed=9, step_s=0.1)}) == []
    assert ticks(w, 2.0, 60.0) == []
    actions = w.tick(61.5, {0: True, 1: True}, None)
    assert isinstance(actions[0], Say) and isinstance(actions[1], CaptureStacks) and actions[2] == KillEverything("stall")
    assert actions[1].stall is w.stall and w.hung
    v = verdict(RankOutput(processes_per_node=2), w, code=-9, node_rank=0, now=62.0, stall_lines=("tune-launch: error: x",))
    assert (v.exit_code, v.lines, v.show_held) == (EXIT_STALLED, ("tune-launch: error: x",), False)


def test_no_stall_judgement_while_a_stop_signal_or_a_dead_rank_is_being_handled():
    w = Watch(grace_s=120, stalls=tracker())
    w.on_stop_signal(signal.SIGTERM)
    assert [type(a) for a in w.tick(1.0, {0: True, 1: True}, {})] == [Say, SignalRanks]
    assert w.tick(2000.0, {0: True, 1: True}, None) == [KillEverything("stop signal: grace period over")]
    dead = Watch(grace_s=120, fail_fast_s=5, stalls=tracker())
    assert dead.tick(1000.0, {0: True, 1: False}, None) == []  # the fail-fast path owns this one


def test_a_stop_signal_while_a_rank_is_stopped_ends_the_job_at_once():
    """A SIGSTOPped rank cannot save: waiting out the grace period would only hold the allocation."""
    w = Watch(grace_s=120, stalls=tracker())
    w.on_stop_signal(signal.SIGTERM)
    actions = w.tick(5.0, {0: True, 1: True}, None, stopped=frozenset({1}))
    assert isinstance(actions[1], CaptureStacks) and isinstance(actions[2], KillEverything)
    assert w.killed_for == "SIGTERM: rank(s) 1 stopped (SIGSTOP) and cannot save a checkpoint" and w.hung


def test_a_suspended_job_is_no_stall_when_it_resumes():
    """SLURM's suspend stops every process of the job, the launcher too; on resume the gap is nobody's stall."""
    w = Watch(grace_s=120, stalls=tracker())
    w.tick(1.0, {0: True, 1: True}, {0: beat(0, 1, steps_timed=9, step_s=0.1), 1: beat(1, 1, steps_timed=9, step_s=0.1)})
    w.tick(1.2, {0: True, 1: True}, None)
    assert w.tick(3600.0, {0: True, 1: True}, None) == []  # an hour later: the launcher was stopped too
    assert ticks(w, 3605.0, 3659.0) == []  # ticking again; 59 s of the limit's 60 s since the resume
    assert any(isinstance(a, KillEverything) for a in w.tick(3661.0, {0: True, 1: True}, None))
