"""On a real two-node SLURM cluster (slurm/dev-cluster.sh: n1 and n2, one CPU each, slurmdbd for sacct):
the embedded default example trains on 2 nodes x 1 gloo process through `sbatch slurm/multi_node.sh` and through
`tune-launch submit`; the pre-timeout signal checkpoints, requeues and resumes on both paths; bad input ends the
job with a clear message and a non-zero exit instead of a hang; a frozen node is named by node 0 and the job ends
(or requeues) within the stall limit. Skipped off CI when SLURM cannot be started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixtures import (ROOT, in_queue, sacct_field, sacct_states, sbatch, slurm_cluster, tails,  # noqa: F401
                            wait_for_text, wait_job)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EXAMPLE = ROOT / "examples" / "pretrain-tiny.yaml"
MULTI = ROOT / "slurm" / "multi_node.sh"
DEV_NODES = ("--gpus-per-node=0", "--cpus-per-task=1")  # the dev cluster's nodes: one CPU, no GPU


def overrides(out: Path, steps: int) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", "checkpoint.save_steps=1000", "eval.eval_at_start=false",
            "logging.logging_steps=1"]


def report(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text())


def assert_one_world_of_two(out: Path, steps: int, logs: str) -> dict:
    r = report(out)
    assert r["world_size"] == 2 and r["steps"] == steps, logs
    assert sorted((x["rank"], x["node"]) for x in r["ranks"]) == [(0, 0), (1, 1)], logs
    node0, node1 = (out / "logs" / "node0.log").read_text(), (out / "logs" / "node1.log").read_text()
    assert "[node0 rank0]" in node0 and "rank 0/2 on node 0" in node0, logs
    assert "[node1 rank1]" in node1 and "rank 1/2 on node 1" in node1, logs
    return r


def test_sbatch_multi_node_trains_on_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(EXAMPLE), *overrides(out, 12))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*")  # noqa: E731
    assert wait_job(job, 150, logs) == "COMPLETED", logs()
    assert sacct_field(job, "ExitCode") == "0:0"
    # per-node logs side by side, named by job id and node: SLURM's output of each node's task and the training's
    names = sorted(p.name for p in (out / "logs").iterdir())
    assert names == ["node0.log", "node1.log", f"slurm-{job}-node0.out", f"slurm-{job}-node1.out"], names
    assert_one_world_of_two(out, 12, logs())
    node1_out = (out / "logs" / f"slurm-{job}-node1.out").read_text()
    assert re.search(r"--machine_rank 1 --main_process_ip n1 --main_process_port 2\d{4}", node1_out), node1_out
    assert "node 1 of 2 on n2" in node1_out


def test_sbatch_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    out, steps = tmp_path / "out", 60
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(EXAMPLE), *overrides(out, steps))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*")  # noqa: E731
    assert wait_for_text((out / "logs", "node0.log"), r"step [2-9]/60", 120), logs()
    # What SLURM does --signal=USR1@120 before the time limit (and at preemption with USR1): every process of the job
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    assert wait_job(job, 180, logs) == "COMPLETED", logs()
    assert sacct_states(job) == ["REQUEUED", "COMPLETED"], logs()
    r = assert_one_world_of_two(out, steps, logs())
    k = r["resumed_at_step"]
    assert 0 < k < steps and r["resumed_from"] == str(out / f"checkpoint-{k}"), logs()  # resumed, not restarted
    node0 = (out / "logs" / f"slurm-{job}-node0.out").read_text()
    assert f"checkpoint-{k} saved after SIGUSR1" in node0 and f"scontrol requeue {job} -> exit 0" in node0, logs()
    assert f"resuming from {out}/checkpoint-{k}" in (out / "logs" / "node1.log").read_text(), logs()
    assert "(restart 1)" in node0


def scontrol_node(name: str, state: str) -> None:
    args = ["scontrol", "update", f"nodename={name}", f"state={state}"] + (["reason=tune-launch test"] if state == "drain" else [])
    subprocess.run(args, check=state == "drain", timeout=30, capture_output=True)


def wait_nodes_idle(names: tuple[str, ...], timeout: float = 90) -> None:
    """A node range starts on as many nodes as are free at once: let the previous test's jobs leave both."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30).stdout.split("\n")
        states = dict(r.split() for r in rows if len(r.split()) == 2)
        if all(states.get(n) == "idle" for n in names):
            return
        time.sleep(0.5)
    pytest.fail(f"nodes {names} not idle after {timeout:.0f} s: {states}")


def test_sbatch_requeue_onto_fewer_nodes_resumes_with_the_same_global_batch(slurm_cluster, tmp_path):
    """`--nodes=1-2`: the first run gets both nodes (world 2); n2 is drained before the pre-timeout signal, so the
    requeued job gets n1 alone. It resumes the 2-process checkpoint with 1 process, gradient accumulation 1 -> 2
    (train.global_batch_size 16 = micro 8 x 2 x 1 = 8 x 1 x 2), and ends COMPLETED with the planned step count."""
    out, steps = tmp_path / "out", 60
    wait_nodes_idle(("n1", "n2"))
    job = sbatch(slurm_cluster, tmp_path, "--nodes=1-2", *DEV_NODES, str(MULTI), str(EXAMPLE), *overrides(out, steps),
                 "train.global_batch_size=16")
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*")  # noqa: E731
    try:
        assert wait_for_text((out / "logs", "node0.log"), r"step [2-9]/60", 120), logs()
        assert "rank 0/2 on node 0" in (out / "logs" / "node0.log").read_text(), logs()
        scontrol_node("n2", "drain")  # running steps go on; nothing new starts on n2
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        assert wait_job(job, 240, logs) == "COMPLETED", logs()
    finally:
        scontrol_node("n2", "resume")
    assert sacct_states(job) == ["REQUEUED", "COMPLETED"], logs()
    r = report(out)
    assert r["world_size"] == 1 and r["steps"] == steps and [(x["rank"], x["node"]) for x in r["ranks"]] == [(0, 0)], logs()
    k = r["resumed_at_step"]
    assert 0 < k < steps and r["resumed_from"] == str(out / f"checkpoint-{k}"), logs()
    assert r["batch"] == {"from_world_size": 2, "to_world_size": 1, "from_accumulation": 1, "to_accumulation": 2,
                          "global_batch": 16, "universal": None, "converted": False}, r["batch"]
    script = next(tmp_path.glob(f"slurm-*-{job}.out")).read_text()
    assert f"job {job} (restart 1): 1 node(s) n1," in script, script
    assert (f"resuming checkpoint-{k}: world size 2 -> 1, gradient accumulation 1 -> 2; global batch kept: 16 = micro "
            "batch 8 x 1 process(es) x accumulation 2") in (out / "logs" / "node0.log").read_text(), logs()


def test_submit_two_nodes_then_requeue_through_submitit(slurm_cluster, tmp_path):
    """`tune-launch submit --nodes 2`: the same world of two; the checkpoint signal goes through the task's
    checkpoint() and submitit's requeue; the requeued task resumes from the checkpoint."""
    out, steps = tmp_path / "out", 60
    argv = [sys.executable, "-m", "tune_launch.launch.cli", "submit", str(EXAMPLE), *overrides(out, steps),
            "--nodes", "2", "--cpus-per-task", "1", "--time", "10", "--wait"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    folder = out / "logs" / "submitit"
    logs = lambda: tails(folder / "*_log.*", out / "logs" / "node*.log")  # noqa: E731
    try:
        assert wait_for_text((out / "logs", "node0.log"), r"step [2-9]/60", 120), logs()
        job = next(folder.glob("*_submitted.pkl")).name.split("_")[0]
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        stdout, stderr = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{stdout}\n{stderr}\n{logs()}"
    assert f"submitted job {job}: 2 node(s)" in stdout and f"job {job} completed" in stdout
    # submitit reads the task's result file; slurmctld may record the end of the job a moment later
    assert wait_job(job, 60, logs) == "COMPLETED"
    assert sacct_states(job) == ["REQUEUED", "COMPLETED"], logs()
    r = assert_one_world_of_two(out, steps, logs())
    assert 0 < r["resumed_at_step"] < steps, logs()
    node0 = (folder / f"{job}_0_log.out").read_text()
    assert "Calling checkpoint method" in node0 and f"Requeued job {job}" in node0, logs()
    assert "--node-rank 1 --main-process-ip n1" in (folder / f"{job}_1_log.out").read_text()


def test_missing_yaml_on_the_compute_node_fails_with_a_message(slurm_cluster, tmp_path):
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), "nowhere/train.yaml")
    assert wait_job(job, 60) == "FAILED"
    assert sacct_field(job, "ExitCode") == "2:0"
    log = next(tmp_path.glob(f"slurm-*-{job}.out")).read_text()
    assert "tune-launch: error: nowhere/train.yaml: no such training YAML on node 0" in log


def test_bad_yaml_fails_in_one_line_without_a_hang(slurm_cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("max_steps:", "max_stepz:"))
    start = time.monotonic()
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(bad))
    assert wait_job(job, 60) == "FAILED" and sacct_field(job, "ExitCode") == "2:0"
    log = next(tmp_path.glob(f"slurm-*-{job}.out")).read_text()
    errors = [ln for ln in log.splitlines() if ln.startswith("tune-launch: error:")]
    assert len(errors) == 1 and "max_stepz" in errors[0] and "Traceback" not in log, log
    assert time.monotonic() - start < 60


def test_more_nodes_than_the_partition_has_is_refused(slurm_cluster, tmp_path):
    proc = slurm_cluster.run(["sbatch", "--nodes=3", *DEV_NODES, str(MULTI), str(EXAMPLE)], cwd=tmp_path)
    assert proc.returncode != 0 and "sbatch: error: Batch job submission failed" in proc.stderr  # not left pending
    proc = slurm_cluster.run([sys.executable, "-m", "tune_launch.launch.cli", "submit", str(EXAMPLE), f"output_dir={tmp_path}/o",
                              "--nodes", "3"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tune-launch: error: --nodes 3: partition debug has 2 node(s); ask for at most 2, "
                                   "or pick a larger --partition")


def test_single_node_script_and_idempotent_up(slurm_cluster, tmp_path):
    up = subprocess.run([str(ROOT / "slurm" / "dev-cluster.sh"), "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0 and "up: partition debug, nodes n1 n2" in up.stdout  # a second `up` changes nothing
    out = tmp_path / "out"
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(ROOT / "slurm" / "single_node.sh"), str(EXAMPLE),
                 *overrides(out, 3))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*")  # noqa: E731
    assert wait_job(job, 120, logs) == "COMPLETED", logs()
    assert report(out)["world_size"] == 1 and report(out)["steps"] == 3
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["node0.log", f"slurm-{job}-node0.out"]


# --------------------------------------------------------------------------- a frozen node (hang detection)

HANG_LIMIT_S = 15


def hang_overrides(out: Path, steps: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", "checkpoint.save_steps=10", "eval.eval_at_start=false",
            "logging.logging_steps=1", f"watchdog.train_step_s={HANG_LIMIT_S}", "watchdog.first_steps_s=120", *extra]


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
    job = sbatch(slurm_cluster, tmp_path, *DEV_NODES, str(MULTI), str(EXAMPLE), *hang_overrides(out, 2000))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*.*")  # noqa: E731
    stopped_at = stop_node1(out, whole_node=True)
    state = wait_job(job, HANG_LIMIT_S + 120, logs)
    took = time.monotonic() - stopped_at
    assert state == "FAILED" and sacct_states(job) == ["FAILED"], logs()
    assert took < HANG_LIMIT_S + 60, f"the job ended {took:.0f} s after node 1 froze"
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
                 *hang_overrides(out, steps, "watchdog.on_stall=requeue"))
    logs = lambda: tails(tmp_path / "slurm-*.out", out / "logs" / "*.*")  # noqa: E731
    stopped_at = stop_node1(out, whole_node=False)
    assert wait_for_text((out / "logs", f"slurm-{job}-node0.out"), r"scontrol requeue", HANG_LIMIT_S + 60), logs()
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
