"""`tune-launch submit train.yaml --nodes N ...`: the same launch, submitted to SLURM through submitit.

Each node's task (`NodeTask`, one per node) reads the allocation from SLURM's environment and runs
`tune-launch --nodes N --node-rank SLURM_NODEID --main-process-ip <first host> --main-process-port <from job id>`.
The task is checkpointable: on the pre-timeout signal or a preemption (USR1, which SLURM delivers to every
process of the job) the training ranks save one atomic checkpoint and exit, the task on node 0 waits for that,
then submitit requeues the job with the same task, which resumes from the checkpoint.
`--local` runs the task on this machine (submitit's local executor: no SLURM needed).
submitit is imported only when a job is built, never at import time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tune_launch.errors import TuneLaunchError
from tune_launch.protocol import grace_seconds
from tune_launch.launch.slurm import (NodeLaunch, SlurmJob, SubmitSpec, check_partition, node_argv, omp_threads, parse_sbatch_options,
                          parse_time_minutes, partition_sizes, sbatch_parameters)



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Submit a training run to SLURM through submitit (or run it locally with --local)."
    p.add_argument("config", help="training YAML (relative paths are resolved from this directory on every node)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override YAML values")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node (default 0: CPU nodes, --cpu-processes gloo processes each)")
    p.add_argument("--cpu-processes", type=int, default=1, help="processes per node on CPU nodes (default 1)")
    p.add_argument("--profile", default="auto", help="launch profile (default auto)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", default="60", help="time limit: minutes, H:MM:SS or D-HH:MM:SS (default 60)")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node for the job")
    p.add_argument("--job-name", default="tune-launch")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit to checkpoint and requeue (default 120)")
    p.add_argument("--max-requeues", type=int, default=3, help="time-limit requeues before giving up (default 3)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any further sbatch option, repeatable: --sbatch qos=high --sbatch constraint=h100")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="submitit's folder: per-node logs <jobid>_<node>_log.out/.err (default: <output_dir>/logs/submitit)")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor instead of SLURM")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit non-zero when it fails")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script submitit would submit, submit nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# --------------------------------------------------------------------------- the task each node runs

def _ignore_usr1() -> None:
    """In the child before exec: accelerate/torchrun keep USR1 ignored (the ranks install their own handler)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@dataclass
class NodeTask:
    """submitit's callable: one per node. Picklable; `checkpoint` is submitit's requeue hook."""

    launch: NodeLaunch
    python: str = sys.executable
    _proc: Any = field(default=None, repr=False, compare=False)
    _signalled: bool = field(default=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"launch": self.launch, "python": self.python}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def argv_and_env(self, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        """This node's tune-launch command and environment (pure: env in, argv/env out)."""
        job = SlurmJob.from_environ(env)
        base = [self.python, "-m", "tune_launch.launch.cli"]
        child = dict(env)
        if job is None:  # --local: one node, this machine
            argv = base + (["--profile", self.launch.profile] if self.launch.profile != "auto" else [])
            argv += (["--gpus", str(self.launch.gpus_per_node)] if self.launch.gpus_per_node
                     else ["--cpu", "--num-processes", str(self.launch.cpu_processes)])
            argv += [self.launch.config, *self.launch.overrides]
            return argv, child
        argv = node_argv(self.launch, job, tune_launch=base)
        processes = job.gpus_on_node or self.launch.cpu_processes
        child.setdefault("OMP_NUM_THREADS", str(omp_threads(job.cpus_per_task or job.cpus_on_node, processes)))
        # submitit requeues this job (checkpoint() below); the launcher inside must not requeue it a second time.
        child["TUNE_LAUNCH_REQUEUE"] = "0"
        child.pop("SLURM_JOB_ID", None)
        child.pop("SLURM_JOBID", None)
        return argv, child

    def __call__(self) -> int:
        argv, env = self.argv_and_env(os.environ)
        rank = os.environ.get("SLURM_NODEID", "0")
        _drop_stale_result(os.environ)
        previous = signal.getsignal(signal.SIGUSR1)

        def on_usr1(signum: int, frame: Any) -> None:
            self._signalled = True
            if rank != "0":  # node 0 requeues, which SIGTERMs every task: leave then, with no result file
                signal.signal(signal.SIGTERM, _leave)
            if callable(previous):
                previous(signum, frame)  # submitit: checkpoint() and requeue on node 0, nothing elsewhere

        signal.signal(signal.SIGUSR1, on_usr1)
        print(f"[tune-launch submit] node {rank}: {shlex.join(argv)}", flush=True)
        self._proc = subprocess.Popen(argv, env=env, preexec_fn=_ignore_usr1)
        while self._proc.poll() is None:  # poll, not wait(): checkpoint() polls it too, from the signal handler
            time.sleep(0.5)
        code = self._proc.returncode
        if self._signalled and rank != "0":
            # Stopped by the checkpoint signal on a node other than 0: node 0's task requeues the job, which ends
            # this one (SIGTERM -> _leave); a return or an error here would be read as this run's result.
            print(f"[tune-launch submit] node {rank}: stopped (exit {code}); waiting for node 0 to requeue the job", flush=True)
            time.sleep(grace_seconds(os.environ) + 60)
            raise RuntimeError(f"node {rank}: stopped by the checkpoint signal, but the job was not requeued")
        if code != 0:
            raise RuntimeError(f"tune-launch on node {rank} exited with code {code}; its log is this task's output")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on node 0 at the checkpoint signal: wait for the ranks' atomic checkpoint, then requeue.

        The ranks got the same signal from SLURM, so it is not forwarded (a second one means 'stop at once').
        """
        from submitit.helpers import DelayedSubmission

        deadline = time.monotonic() + grace_seconds(os.environ) + 30
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        state = "running" if self._proc is not None and self._proc.poll() is None else f"exit {getattr(self._proc, 'returncode', None)}"
        print(f"[tune-launch submit] checkpoint signal: training stopped ({state}); requeueing to resume", flush=True)
        return DelayedSubmission(NodeTask(self.launch, self.python))


def _leave(signum: int, _frame: Any) -> None:
    print("[tune-launch submit] job requeued; this run ends here", flush=True)
    sys.stdout.flush()
    os._exit(0)


def _drop_stale_result(env: Mapping[str, str]) -> None:
    """A requeued run must not leave the previous run's result file of this task for the submitter to read."""
    if not (env.get("SLURM_RESTART_COUNT") or "0").strip("0"):
        return
    try:
        import submitit

        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except (RuntimeError, OSError, KeyError):
        pass


# --------------------------------------------------------------------------- building and submitting

def spec_from_args(args: argparse.Namespace) -> SubmitSpec:
    config = Path(args.config)
    if not config.is_file():
        raise TuneLaunchError(f"{args.config}: no such training YAML; pass the path of one (see examples/)")
    if args.cpu_processes < 1:
        raise TuneLaunchError(f"--cpu-processes {args.cpu_processes}: must be at least 1")
    if args.max_requeues < 0:
        raise TuneLaunchError(f"--max-requeues {args.max_requeues}: must be 0 or more")
    launch = NodeLaunch(config=str(config.resolve()), overrides=tuple(args.overrides), profile=args.profile,
                        cpu_processes=args.cpu_processes, gpus_per_node=args.gpus_per_node)
    return SubmitSpec(launch=launch, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                      time_min=parse_time_minutes(args.time), partition=args.partition, account=args.account,
                      job_name=args.job_name, signal_delay_s=args.signal_delay, extra=parse_sbatch_options(args.sbatch))


def log_folder(args: argparse.Namespace, spec: SubmitSpec) -> Path:
    if args.log_dir is not None:
        return args.log_dir.resolve()
    from tune_launch.training.config import load_config

    cfg = load_config(spec.launch.config, list(spec.launch.overrides), check_files=False)
    return (Path(cfg.output_dir) / "logs" / "submitit").resolve()


def submitit_command(python: str, folder: Path) -> str:
    """The command submitit's sbatch script runs through srun (as SlurmExecutor._submitit_command_str)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(spec: SubmitSpec, folder: Path, python: str = sys.executable) -> str:
    """The sbatch script submitit writes for this submission (its own template, our parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **sbatch_parameters(spec))


def _check_cluster(spec: SubmitSpec) -> None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise TuneLaunchError("sinfo not found: not on a SLURM cluster; use --local to run here, or slurm/dev-cluster.sh up") from None
    except subprocess.TimeoutExpired:
        raise TuneLaunchError("sinfo did not answer in 30 s: is slurmctld up? (scontrol ping)") from None
    if out.returncode != 0:
        raise TuneLaunchError(f"sinfo failed: {' '.join(out.stderr.split())[:200]}; is slurmctld up? (scontrol ping)")
    sizes, default = partition_sizes(out.stdout)
    check_partition(spec, sizes, default)


def make_executor(spec: SubmitSpec, folder: Path, local: bool, max_requeues: int) -> Any:
    import submitit

    if local:
        if spec.nodes != 1:
            raise TuneLaunchError(f"--local runs on this machine: --nodes {spec.nodes} needs SLURM (drop --local)")
        ex = submitit.AutoExecutor(folder=folder, cluster="local", slurm_max_num_timeout=max_requeues)
        ex.update_parameters(timeout_min=spec.time_min, tasks_per_node=1, gpus_per_node=spec.gpus_per_node,
                             name=spec.job_name)
        return ex
    from submitit.slurm.slurm import SlurmExecutor

    ex = SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    ex.update_parameters(**sbatch_parameters(spec))
    return ex


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hits = [ln for ln in lines if ln.startswith(("RuntimeError", "tune-launch: error", "Job not requeued", "sbatch: error"))]
    return (hits or lines or [type(exc).__name__])[-1][:400]


def run_from_args(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    folder = log_folder(args, spec)
    if args.dry_run:
        if args.local:
            print(f"# --local: submitit runs on this machine (no sbatch); each task runs:\n"
                  f"# {shlex.join(NodeTask(spec.launch).argv_and_env({})[0])}")
            return 0
        print(sbatch_script(spec, folder), end="")
        return 0
    if not args.local:
        _check_cluster(spec)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(spec, folder, args.local, args.max_requeues)
    try:
        job = executor.submit(NodeTask(spec.launch))
    except Exception as e:  # submitit wraps sbatch's own message
        raise TuneLaunchError(f"submission failed: {_one_line(e)}") from None
    print(f"submitted job {job.job_id}: {spec.nodes} node(s) x "
          f"{spec.gpus_per_node or spec.launch.cpu_processes} {'GPU' if spec.gpus_per_node else 'CPU process'}(es); "
          f"logs {folder}/{job.job_id}_<node>_log.out (and the training's <output_dir>/logs/node<N>.log)", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as e:  # FailedJobError / UncompletedJobError carry the remote traceback
        raise TuneLaunchError(f"job {job.job_id} failed: {_one_line(e)}; logs: {folder}/{job.job_id}_*_log.*") from None
    print(f"job {job.job_id} completed", flush=True)
    return 0
