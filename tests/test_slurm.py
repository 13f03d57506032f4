"""SLURM pieces that need no cluster: node lists, the job's environment, ports, per-node argv, submission
parameters, the sbatch script submitit would use (golden file), and the sbatch scripts' own guards.
The real two-node cluster runs in tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tune_launch.errors import TuneLaunchError
from tune_launch.launch.slurm import (NodeLaunch, SlurmJob, SubmitSpec, check_partition, expand_nodelist, node_argv,
                          omp_threads, parse_sbatch_options, parse_time_minutes, partition_sizes, port_from_job_id,
                          sbatch_parameters)
from tune_launch.launch.submit import NodeTask

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


# --------------------------------------------------------------------------- node lists

@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("n[1-2],gpu[01-03]", ["n1", "n2", "gpu01", "gpu02", "gpu03"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("node[1,3,5-6]", ["node1", "node3", "node5", "node6"]),
    ("a1,b2,c3", ["a1", "b2", "c3"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("gpu-a100-[001-002].cluster", ["gpu-a100-001.cluster", "gpu-a100-002.cluster"]),
    ("x[9-10]", ["x9", "x10"]),
    ("n[1-2], m5", ["n1", "n2", "m5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[[1-2]]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


# --------------------------------------------------------------------------- ports

def test_port_from_job_id_is_stable_in_range_and_moves_on_restart():
    assert port_from_job_id("1234567") == 20000 + 4567
    assert port_from_job_id(7) == 20007
    assert port_from_job_id("7", restart_count=1) == 21007
    assert port_from_job_id("9999", restart_count=1) == 20999  # wraps inside the span
    ports = {port_from_job_id(j, r) for j in range(0, 30000, 7) for r in range(3)}
    assert min(ports) >= 20000 and max(ports) < 30000
    with pytest.raises(TuneLaunchError, match="SLURM job id"):
        port_from_job_id("abc")


@pytest.mark.parametrize("job_id, restarts", [("5", "0"), ("123456", "0"), ("42", "2"), ("9999", "1")])
def test_multi_node_sh_computes_the_same_port(job_id, restarts):
    """The sbatch script's bash arithmetic and launch/slurm.py must agree, or nodes rendezvous on different ports."""
    line = next(ln for ln in (ROOT / "slurm" / "multi_node.sh").read_text().splitlines() if ln.startswith("MAIN_PORT="))
    out = subprocess.run(["bash", "-c", f"{line}; echo $MAIN_PORT"], capture_output=True, text=True, timeout=10,
                         env={"SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": restarts, "PATH": os.environ["PATH"]})
    assert int(out.stdout) == port_from_job_id(job_id, int(restarts))


# --------------------------------------------------------------------------- the job's environment

def _env(**kw):
    base = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "1",
            "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "SLURM_RESTART_COUNT": "1",
            "SLURM_JOB_PARTITION": "gpu", "SLURM_SUBMIT_DIR": "/home/u/run"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_slurm_job_from_environ_reads_everything():
    job = SlurmJob.from_environ(_env())
    assert job == SlurmJob(job_id="77", num_nodes=2, node_rank=1, nodes=("n1", "n2"), gpus_on_node=8, cpus_on_node=64,
                           restart_count=1, partition="gpu", submit_dir="/home/u/run")
    assert job.main_host == "n1" and job.main_port == port_from_job_id("77", 1)


def test_slurm_job_outside_slurm_is_none():
    assert SlurmJob.from_environ({"PATH": "/bin"}) is None


@pytest.mark.parametrize("env, expect", [
    (_env(SLURM_JOB_NUM_NODES=None, SLURM_NNODES="2"), {"num_nodes": 2}),  # older SLURM name
    (_env(SLURM_JOB_NODELIST=None, SLURM_NODELIST="gpu[01-02]"), {"nodes": ("gpu01", "gpu02")}),
    (_env(SLURM_GPUS_ON_NODE=None, SLURM_JOB_GPUS="0,1,2,3"), {"gpus_on_node": 4}),
    (_env(SLURM_GPUS_ON_NODE=None), {"gpus_on_node": 0}),
    (_env(SLURM_NODEID="0", SLURMD_NODENAME="n2"), {"node_rank": 0}),  # rank from NODEID, never the host name
    (_env(SLURM_CPUS_ON_NODE="2(x2)"), {"cpus_on_node": 2}),
    (_env(SLURM_JOB_ID=None, SLURM_JOBID="12"), {"job_id": "12"}),
])
def test_slurm_job_variants(env, expect):
    job = SlurmJob.from_environ(env)
    for key, value in expect.items():
        assert getattr(job, key) == value


@pytest.mark.parametrize("env, message", [
    (_env(SLURM_JOB_NUM_NODES="3"), r"SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST='n\[1-2\]' names 2 host"),
    (_env(SLURM_NODEID="2"), r"SLURM_NODEID=2 is outside 0..1"),
    (_env(SLURM_JOB_NODELIST="n[1-"), r"SLURM_JOB_NODELIST: node list"),
    (_env(SLURM_JOB_NODELIST=""), r"SLURM_JOB_NODELIST is empty"),
])
def test_slurm_job_inconsistent_environment_is_one_clear_error(env, message):
    with pytest.raises(TuneLaunchError, match=message):
        SlurmJob.from_environ(env)


# --------------------------------------------------------------------------- what each node runs

def test_node_argv_gpu_and_cpu_nodes():
    launch = NodeLaunch(config="/abs/train.yaml", overrides=("train.max_steps=5",), profile="fsdp", cpu_processes=2)
    gpu_job = SlurmJob.from_environ(_env())
    assert node_argv(launch, gpu_job) == [
        "tune-launch", "--profile", "fsdp", "--gpus", "8", "--nodes", "2", "--node-rank", "1",
        "--main-process-ip", "n1", "--main-process-port", str(port_from_job_id("77", 1)),
        "/abs/train.yaml", "train.max_steps=5"]
    cpu_job = SlurmJob.from_environ(_env(SLURM_GPUS_ON_NODE="0", SLURM_NODEID="0", SLURM_RESTART_COUNT=None))
    assert node_argv(NodeLaunch(config="t.yaml"), cpu_job, tune_launch=("py", "-m", "tune_launch.launch.cli")) == [
        "py", "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "1", "--nodes", "2", "--node-rank", "0",
        "--main-process-ip", "n1", "--main-process-port", "20077", "t.yaml"]


def test_node_task_env_inside_slurm_hands_requeue_to_submitit():
    env = _env(SLURM_GPUS_ON_NODE="0", SLURM_CPUS_PER_TASK="4", PATH="/bin")
    argv, child = NodeTask(NodeLaunch(config="/c.yaml", cpu_processes=2), python="/py").argv_and_env(env)
    assert argv[:3] == ["/py", "-m", "tune_launch.launch.cli"] and argv[3:6] == ["--cpu", "--num-processes", "2"]
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert child["OMP_NUM_THREADS"] == "2"  # 4 cores from SLURM / 2 processes
    assert child["TUNE_LAUNCH_REQUEUE"] == "0" and "SLURM_JOB_ID" not in child
    assert child["SLURM_NODEID"] == "1" and child["PATH"] == "/bin"


def test_node_task_outside_slurm_runs_one_local_node():
    argv, _ = NodeTask(NodeLaunch(config="/c.yaml", overrides=("a.b=1",)), python="/py").argv_and_env({"PATH": "/bin"})
    assert argv == ["/py", "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "1", "/c.yaml", "a.b=1"]


def test_node_task_pickles_without_its_process():
    import pickle

    task = NodeTask(NodeLaunch(config="/c.yaml"), python="/py")
    task._proc = object()  # not picklable in general; must not travel
    back = pickle.loads(pickle.dumps(task))
    assert back.launch == task.launch and back.python == "/py" and back._proc is None


def test_omp_threads():
    assert omp_threads(64, 8) == 8 and omp_threads(1, 2) == 1 and omp_threads(None, 1) == 1


# --------------------------------------------------------------------------- submission parameters

@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("1:05", 2), ("5:00", 5), ("1-00:30", 1470), ("1-2:03:04", 1564)])
def test_parse_time_minutes(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "0", "1:2:3:4", "-5"])
def test_parse_time_minutes_rejects(bad):
    with pytest.raises(TuneLaunchError, match="--time"):
        parse_time_minutes(bad)


def test_sbatch_parameters_checkpoint_signal_and_requeue():
    spec = SubmitSpec(launch=NodeLaunch(config="/c.yaml"), nodes=4, gpus_per_node=8, cpus_per_task=32, time_min=600,
                      partition="gpu", account="proj", extra=parse_sbatch_options(["qos=high", "exclusive"]))
    params = sbatch_parameters(spec)
    assert params["nodes"] == 4 and params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 8
    assert params["time"] == 600 and params["partition"] == "gpu" and params["account"] == "proj"
    assert params["additional_parameters"] == {"requeue": True, "signal": "USR1@120", "qos": "high", "exclusive": True}
    assert params["setup"][0] == "export SUBMITIT_PREEMPT_SIGNAL=USR1"
    cpu = sbatch_parameters(SubmitSpec(launch=NodeLaunch(config="/c.yaml")))
    assert "gpus_per_node" not in cpu and "partition" not in cpu  # the cluster's defaults


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes 0"), ({"gpus_per_node": -1}, "--gpus-per-node -1"), ({"cpus_per_task": 0}, "--cpus-per-task 0"),
    ({"time_min": 1, "signal_delay_s": 120}, "--signal-delay 120: must be between 1 s and the time limit \\(60 s\\)"),
])
def test_submit_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(TuneLaunchError, match=message):
        SubmitSpec(launch=NodeLaunch(config="/c.yaml"), **kwargs)


@pytest.mark.parametrize("bad", ["=x", "Bad Key=1", "9lives=1"])
def test_parse_sbatch_options_rejects(bad):
    with pytest.raises(TuneLaunchError, match="--sbatch"):
        parse_sbatch_options([bad])


def test_partition_check_refuses_more_nodes_than_the_partition_has():
    sizes, default = partition_sizes("debug* 2\ngpu 16\ngpu 4\n")
    assert sizes == {"debug": 2, "gpu": 20} and default == "debug"
    spec = SubmitSpec(launch=NodeLaunch(config="/c.yaml"), nodes=3)
    with pytest.raises(TuneLaunchError, match="--nodes 3: partition debug has 2 node"):
        check_partition(spec, sizes, default)
    check_partition(SubmitSpec(launch=NodeLaunch(config="/c.yaml"), nodes=3, partition="gpu"), sizes, default)
    with pytest.raises(TuneLaunchError, match="--partition nope: no such partition here; partitions: debug, gpu"):
        check_partition(SubmitSpec(launch=NodeLaunch(config="/c.yaml"), partition="nope"), sizes, default)


# --------------------------------------------------------------------------- the dry run (golden sbatch script)

def _submit(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "submit", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_submit_dry_run_prints_submitits_sbatch_script(tmp_path):
    out = tmp_path / "out"
    proc = _submit(str(ROOT / "examples" / "pretrain-tiny.yaml"), f"output_dir={out}", "train.max_steps=20",
                   "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "32", "--partition", "gpu",
                   "--time", "2:00:00", "--account", "proj", "--sbatch", "qos=high", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace(str(out / "logs" / "submitit"), "<LOG_DIR>").replace(sys.executable, "<PYTHON>")
    golden = GOLDEN / "submit_dry_run.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    # The lines that make it work, asserted one by one as well:
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --time=120", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "export SUBMITIT_PREEMPT_SIGNAL=USR1",
                 "#SBATCH --output=<LOG_DIR>/%j_0_log.out"):
        assert line in text.splitlines()
    assert re.search(r"^srun --unbuffered --output <LOG_DIR>/%j_%t_log.out .* <PYTHON> -u -m submitit.core._submit <LOG_DIR>$",
                     text, re.M)


def test_submit_dry_run_is_what_the_executor_would_write(tmp_path):
    """Same text as submitit's own SlurmExecutor builds (it needs `srun` on PATH: a fake one is enough here)."""
    from submitit.slurm.slurm import SlurmExecutor

    from tune_launch.launch.submit import sbatch_script, submitit_command

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    spec = SubmitSpec(launch=NodeLaunch(config="/c.yaml"), nodes=2, gpus_per_node=4, partition="p", time_min=30)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old}"
    try:
        ex = SlurmExecutor(folder=tmp_path / "logs")
    finally:
        os.environ["PATH"] = old
    ex.update_parameters(**sbatch_parameters(spec))
    assert ex._submitit_command_str == submitit_command(sys.executable, ex.folder)
    assert ex._make_submission_file_text(ex._submitit_command_str, "x") == sbatch_script(spec, ex.folder)


@pytest.mark.parametrize("argv, message", [
    (["missing.yaml", "--dry-run"], "missing.yaml: no such training YAML"),
    (["{tiny}", "--time", "1h", "--dry-run"], "--time '1h'"),
    (["{tiny}", "--nodes", "0", "--dry-run"], "--nodes 0: must be at least 1"),
    (["{tiny}", "--local", "--nodes", "2"], "--local runs on this machine: --nodes 2 needs SLURM"),
])
def test_submit_bad_input_is_one_line_exit_2(tmp_path, argv, message):
    argv = [a.replace("{tiny}", str(ROOT / "examples" / "pretrain-tiny.yaml")) for a in argv]
    proc = _submit(argv[0], f"output_dir={tmp_path / 'o'}", *argv[1:], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the sbatch scripts' guards

@pytest.mark.parametrize("script", ["multi_node.sh", "single_node.sh"])
def test_sbatch_scripts_outside_slurm_say_so(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / script), "train.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not inside a SLURM job: submit with sbatch" in proc.stderr


@pytest.mark.parametrize("script", ["multi_node.sh", "single_node.sh"])
def test_sbatch_headers_document_the_essentials(script):
    text = (ROOT / "slurm" / script).read_text()
    tasks = ("--ntasks-per-node=1",) if script == "single_node.sh" else ()
    for option in ("--nodes=", *tasks, "--gpus-per-node=", "--cpus-per-task=", "--time=",
                   "--signal=USR1@", "--requeue", "--open-mode=append"):
        assert re.search(rf"^#SBATCH {re.escape(option)}\S*\s+# \w", text, re.M), option
    if script == "multi_node.sh":  # with it, SLURM sizes a --nodes=2-4 range by its minimum (measured on the dev cluster)
        assert not re.search(r"^#SBATCH --ntasks-per-node", text, re.M) and "a range (2-4" in text
    assert "SLURM_NODEID" in text  # node rank from SLURM, never from host names
    if script == "multi_node.sh":
        assert '--node-rank "$SLURM_NODEID"' in text and "scontrol show hostnames" in text


def test_dev_cluster_script_usage_and_root_guard():
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "dev-cluster.sh"), "bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.slow
def test_submit_local_runs_through_submitits_local_executor(tmp_path):
    """--local: cluster="local" even where `srun` is on PATH; the training really runs and the task's log is kept."""
    out = tmp_path / "out"
    proc = _submit(str(ROOT / "examples" / "pretrain-tiny.yaml"), f"output_dir={out}", "train.max_steps=3",
                   "eval.eval_at_start=false", "--local", "--wait", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert f"job {job} completed" in proc.stdout
    log = (out / "logs" / "submitit" / f"{job}_0_log.out").read_text()
    assert "--cpu --num-processes 1" in log and "done: 3 steps" in log
    assert "SUBMITIT_EXECUTOR" not in log and (out / "run_report.json").is_file()


def test_cluster_fixture_skips_off_ci_and_fails_on_ci(monkeypatch):
    """Without SLURM: a skip with the reason on a laptop, a failure under CI=true (the tests must run there)."""
    from slurm_fixtures import _unavailable

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="SLURM dev cluster unavailable: no root"):
        _unavailable("no root")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the SLURM tests must run, but no root"):
        _unavailable("no root")
