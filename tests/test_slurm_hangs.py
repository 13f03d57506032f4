"""A frozen node on the real two-node SLURM dev cluster (slurm/dev-cluster.sh: n1 and n2, one CPU each): the
embedded default trains on 2 nodes x 1 gloo process through `sbatch slurm/multi_node.sh`, then node 1's
processes are stopped with SIGSTOP mid-training. Node 0's launcher sees node 1's heartbeats stop, names it,
and ends the job within the stall limit plus 60 s; `sacct` shows it failed (or requeued, then completed after
a resume, when the YAML asks for it), and nothing of the job is left running. Run under
`flock /tmp/tune-launch-slurm.lock` on a shared machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_fixtures import ROOT, in_queue, sacct_states, sbatch, slurm_cluster, tails, wait_for_text, wait_job  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EXAMPLE = ROOT / "examples" / "pretrain-tiny.yaml"
MULTI = ROOT / "slurm" / "multi_node.sh"
DEV_NODES = ("--gpus-per-node=0", "--cpus-per-task=1")
LIMIT_S = 15


def overrides(out: Path, steps: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", "checkpoint.save_steps=10", "eval.eval_at_start=false",
            "logging.logging_steps=1", f"watchdog.train_step_s={LIMIT_S}", "watchdog.first_steps_s=120", *extra]


def node1_processes(out: Path, whole_node: bool) -> list:
    """Node 1's rank (from its heartbeat), and with `whole_node` its accelerate/torchrun and tune-launch too."""
    import psutil

    beat = json.loads((out / "heartbeat" / "rank1.json").read_text())
    assert beat["node"] == 1
    rank = psutil.Process(beat["pid"])
    procs = [rank]
    for parent in rank.parents() if whole_node else ():
        if parent.environ().get("SLURM_NODEID") != "1":
            break
        procs.append(parent)
        if any(part.endswith("tune-launch") or part == "tune_launch.launch.cli" for part in parent.cmdline()):
            break
    assert not whole_node or len(procs) == 3, [p.cmdline()[:4] for p in procs]  # rank, accelerate/torchrun, tune-launch
    return procs[::-1]  # the launcher first: it must not see its children stop


def stop_node1(out: Path, whole_node: bool) -> float:
    assert wait_for_text((out / "logs", "node0.log"), r"step (1[2-9]|[2-9]\d)/", 150), "training did not get going"
    for p in node1_processes(out, whole_node):
        print(f"SIGSTOP {p.pid}: {' '.join(p.cmdline()[:4])}")
        os.kill(p.pid, signal.SIGSTOP)
    return time.monotonic()


def nothing_left(job: str, out: Path) -> None:
    import psutil

    assert not in_queue(job)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of job {job} still run: {left}"


def test_a_frozen_node_is_named_by_node_0_and_the_job_fails_without_holding_the_allocation(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(EXAMPLE), *overrides(out, 2000))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*.*")  # noqa: E731
    stopped_at = stop_node1(out, whole_node=True)
    state = wait_job(job, LIMIT_S + 120, logs)
    took = time.monotonic() - stopped_at
    assert state == "FAILED" and sacct_states(job) == ["FAILED"], logs()
    assert took < LIMIT_S + 60, f"the job ended {took:.0f} s after node 1 froze"
    node0 = (out / "logs" / f"slurm-{job}-node0.out").read_text()
    errors = [line for line in node0.splitlines() if line.startswith("tune-launch: error:")]
    assert len(errors) == 1 and errors[0].startswith("tune-launch: error: rank 1 (node 1) stalled in train step"), logs()
    assert "no heartbeat for" in errors[0] and "(frozen or gone)" in errors[0]
    assert "node 1's launcher did not answer" in node0
    assert "rank 0 (node 0, pid" in node0 and "waits in" in node0  # where node 0's rank waits
    assert list((out / "logs").glob("stall-*-node0.txt"))
    nothing_left(job, out)
    print(f"node 1 frozen: job {job} FAILED {took:.0f} s later: {errors[0]}")


def test_a_stopped_node_answers_with_its_stacks_and_the_job_requeues_and_resumes_when_asked(slurm_cluster, tmp_path):
    out, steps = tmp_path / "out", 60
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(EXAMPLE),
                 *overrides(out, steps, "watchdog.on_stall=requeue"))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*.*")  # noqa: E731
    stopped_at = stop_node1(out, whole_node=False)
    assert wait_for_text((out / "logs", f"slurm-{job}-node0.out"), r"scontrol requeue", LIMIT_S + 60), logs()
    took = time.monotonic() - stopped_at
    assert wait_job(job, 240, logs) == "COMPLETED", logs()
    assert sacct_states(job) == ["REQUEUED", "COMPLETED"], logs()
    node0 = (out / "logs" / f"slurm-{job}-node0.out").read_text()
    assert "tune-launch: error: rank 1 (node 1) stalled in train step" in node0 and "process stopped (SIGSTOP)" in node0, logs()
    assert "requeueing the job" in node0 and f"scontrol requeue {job} -> exit 0" in node0
    assert list((out / "logs").glob("stall-*-node1.txt")), "node 1's launcher wrote no stacks"
    report = json.loads((out / "run_report.json").read_text())
    assert report["steps"] == steps and 0 < report["resumed_at_step"] < steps, logs()
    nothing_left(job, out)
    print(f"node 1 stopped: requeue {took:.0f} s later, resumed at step {report['resumed_at_step']}")
