"""The supervisor's judgement as pure functions: lines and process events in, actions and a verdict out."""

from __future__ import annotations

import signal

from tune_launch.launch.supervision import (FAIL_FAST_S, HARD_DEADLINE_S, KillEverything, RankOutput, Say, SignalRanks,
                                            Watch, exit_detail, verdict)
from tune_launch.protocol import LAUNCHER_GRACE_MARGIN_S, failure_line, grace_seconds, parse_failure_line
from tune_launch.training.config import ConfigError

ROOT_CAUSE_LINES = [  # torchrun's report and the ranks' own lines, as they arrive on stderr (from a real run)
    "[rank0]: RuntimeError: boom\n",
    "[tune-launch] rank 0 failed: RuntimeError: [pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer.\n",
    "E1123 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 11) of binary: python\n",
    "Failures:\n", "[1]:\n", "  rank      : 0 (local_rank: 0)\n", "  exitcode  : 1 (pid: 11) \n",
    "Root Cause (first observed failure):\n", "[0]:\n", "  rank      : 1 (local_rank: 1)\n",
    "  exitcode  : -9 (pid: 12) \n",
]


def feed(output: RankOutput, lines: list[str], now: float = 100.0) -> list[bool]:
    return [output.feed(line, now) for line in lines]


def test_the_root_cause_is_named_not_the_peer_that_lost_its_connection():
    out = RankOutput(node_rank=0, processes_per_node=2)
    # after a rank's own failure line, torchrun's report is held back ...
    assert feed(out, ROOT_CAUSE_LINES) == [True, True] + [False] * (len(ROOT_CAUSE_LINES) - 2)
    f = out.culprit(gone={}, killed=set(), now=101.0)
    assert (f.rank, f.detail, f.exitcode, f.refused) == (1, "killed by SIGKILL", -9, False)
    v = verdict(out, Watch(grace_s=120), code=1, node_rank=0, now=101.5)
    assert v.exit_code == 1 and v.show_held  # ... and shown: the culprit, rank 1, said nothing itself
    assert v.lines == ("tune-launch: error: rank 1 (node 0) failed: killed by SIGKILL; every rank had exited 1.5 s later",)


def test_local_ranks_are_numbered_globally_on_later_nodes():
    out = RankOutput(node_rank=2, processes_per_node=4)
    feed(out, ["E1 api.py] failed (exitcode: 3) local_rank: 1 (pid: 9) of binary: python\n"])
    assert out.exitcodes == {9: 3} and out.root_rank == 9


def test_a_refusal_holds_back_the_launchers_traceback_and_exits_2():
    out = RankOutput()
    line = failure_line(0, ConfigError("checkpoint.resume: bad\nthing"), refused=True)
    assert line == "[tune-launch] rank 0 refused: ConfigError: checkpoint.resume: bad\\nthing"
    shown = feed(out, [line + "\n", "Traceback (most recent call last):\n", "  File x\n",
                       "12:00:01 [node0 rank0] INFO tune_launch: still tagged\n"])
    assert shown == [True, False, False, True]  # rank log lines keep flowing
    v = verdict(out, Watch(grace_s=120), code=1, node_rank=0, now=100.0)
    assert v.exit_code == 2 and not v.show_held and len(v.lines) == 1  # the loop keeps the held lines in a log file
    assert v.lines[0].startswith("tune-launch: error: rank 0 (node 0) failed: ConfigError: checkpoint.resume: bad")


def test_a_crash_line_is_not_a_refusal():
    parsed = parse_failure_line(failure_line(3, RuntimeError("oom  at\tstep 4")))
    assert (parsed.rank, parsed.refused, parsed.detail) == (3, False, "RuntimeError: oom at step 4")
    assert parse_failure_line("[node0 rank0] rank 1 failed somewhere") is None


def test_a_dead_rank_gets_its_survivors_killed_after_the_fail_fast_delay_then_everything():
    w = Watch(grace_s=120)
    assert w.tick(0.0, {0: True, 1: True}) == []
    assert w.tick(1.0, {0: True, 1: False}) == []  # rank 1 gone at t=1
    assert w.tick(1.0 + FAIL_FAST_S, {0: True, 1: False}) == []  # not yet over the delay
    assert w.tick(1.1 + FAIL_FAST_S, {0: True, 1: False}) == [SignalRanks(signal.SIGKILL, (0,))]
    assert w.killed == {0} and w.killed_for == "rank 1 is gone"
    assert w.tick(2.0 + FAIL_FAST_S, {0: True, 1: False}) == []  # killed once, then wait for torchrun's report
    late = 1.2 + FAIL_FAST_S + HARD_DEADLINE_S
    assert w.tick(late, {0: True, 1: False}) == [KillEverything("rank 1 is gone")]
    out = RankOutput(processes_per_node=2)
    v = verdict(out, w, code=-9, node_rank=0, now=late)
    assert v.exit_code == 137 and "rank 1 (node 0) failed: exited while the other ranks were running" in v.lines[0]


def test_a_stop_signal_is_passed_on_once_then_bounded_by_the_grace_period():
    w = Watch(grace_s=30)
    w.on_stop_signal(signal.SIGTERM)
    first = w.tick(10.0, {0: True, 1: True})
    assert isinstance(first[0], Say) and first[0].text.startswith("SIGTERM: asking every rank to save")
    assert first[1:] == [SignalRanks(signal.SIGUSR1, (0, 1))]
    assert w.tick(10.0 + 30 + LAUNCHER_GRACE_MARGIN_S, {0: True, 1: True}) == []
    assert w.tick(10.1 + 30 + LAUNCHER_GRACE_MARGIN_S, {0: True, 1: True}) == [KillEverything("stop signal: grace period over")]
    again = Watch(grace_s=30)
    again.on_stop_signal(signal.SIGINT)
    again.tick(0.0, {0: True})
    again.on_stop_signal(signal.SIGINT)
    assert again.tick(0.2, {0: True}) == [KillEverything("second stop signal")]


def test_a_clean_stop_requeues_only_for_the_preemption_signals():
    for signum, requeue in ((signal.SIGTERM, True), (signal.SIGUSR1, True), (signal.SIGINT, False)):
        w = Watch(grace_s=30)
        w.on_stop_signal(signum)
        w.tick(0.0, {0: True})
        v = verdict(RankOutput(), w, code=0, node_rank=0, now=1.0)
        assert (v.exit_code, v.requeue) == (0, requeue)
        assert v.lines[0].startswith(f"[tune-launch] stopped by {signal.Signals(signum).name}: every rank saved")


def test_a_stop_before_the_training_loop_names_the_signal():
    w = Watch(grace_s=30)
    w.on_stop_signal(signal.SIGTERM)
    out = RankOutput(processes_per_node=2)
    feed(out, ["E api.py] failed (exitcode: 143) local_rank: 0 (pid: 5) of binary: x\n",
               "E api.py] failed (exitcode: -15) local_rank: 1 (pid: 6) of binary: x\n"])
    v = verdict(out, w, code=1, node_rank=0, now=3.0)
    assert v.exit_code == 128 + signal.SIGTERM and "before the training loop" in v.lines[0]


def test_a_failed_launch_without_rank_evidence_says_so():
    v = verdict(RankOutput(), Watch(grace_s=1), code=3, node_rank=0, now=0.0)
    assert v == v.__class__(3, ("tune-launch: error: the launch failed (exit code 3); see the rank logs above",))
    assert verdict(RankOutput(), Watch(grace_s=1), code=0, node_rank=0, now=0.0).exit_code == 0
    assert exit_detail(-9) == "killed by SIGKILL" and exit_detail(3) == "exit code 3"


def test_grace_seconds_reads_one_variable_with_a_default():
    assert grace_seconds({"TUNE_LAUNCH_GRACE_S": "45"}) == 45.0
    assert grace_seconds({}) == grace_seconds({"TUNE_LAUNCH_GRACE_S": "soon"}) == grace_seconds({"TUNE_LAUNCH_GRACE_S": "-1"}) == 120.0
