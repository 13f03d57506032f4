"""A real two-node SLURM cluster for the tests (slurm/dev-cluster.sh), and small helpers to submit and wait.

The session fixture starts the cluster once and always stops it at the end, failing tests included. Without
root or a way to install SLURM it skips with the reason, except under CI=true, where the tests must run.
Concurrent pytest sessions on one machine take turns (a lock file), so one session's `down` cannot pull
the cluster from under another's jobs.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "dev-cluster.sh"
LOCK = Path("/tmp/tune-launch-dev-cluster.lock")
DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/slurmdbd", "/usr/sbin/munged", "/usr/sbin/mariadbd")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true: the SLURM tests must run, but {reason}", pytrace=False)
    pytest.skip(f"SLURM dev cluster unavailable: {reason}")


def _lock(timeout_s: float = 900):
    handle = open(LOCK, "w")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                _unavailable(f"another test session held {LOCK} for {timeout_s:.0f} s")
            time.sleep(1)


@dataclass(frozen=True)
class Cluster:
    """What the tests need to run jobs: the environment jobs inherit (venv on PATH, shared output dir)."""

    env: dict

    def run(self, argv: list[str], cwd: Path, timeout: float = 60, **env) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.pop("OMP_NUM_THREADS", None)  # the scripts derive it from the cores SLURM gives each node
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["TUNE_LAUNCH_SHARED_FS"] = "1"  # n1 and n2 share this machine's disk: output_dir is shared
    env["TUNE_LAUNCH_GRACE_S"] = "60"
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        _unavailable("not root (slurm/dev-cluster.sh installs packages and starts daemons as root)")
    if not all(Path(p).exists() for p in DAEMONS) and shutil.which("apt-get") is None:
        _unavailable("SLURM is not installed and there is no apt-get to install it")
    handle = _lock()
    try:
        up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            _unavailable(f"`slurm/dev-cluster.sh up` failed (exit {up.returncode}): {(up.stderr or up.stdout).strip()[-800:]}")
        yield Cluster(env=job_env())
    finally:
        if os.environ.get("TUNE_LAUNCH_KEEP_DEV_CLUSTER") != "1":
            subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=180)
        handle.close()


# --------------------------------------------------------------------------- jobs

def sbatch(cluster: Cluster, cwd: Path, *argv: str) -> str:
    """Submit and return the job id (fails the test with sbatch's message)."""
    proc = cluster.run(["sbatch", "--parsable", *argv], cwd=cwd)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def sacct_states(job_id: str) -> list[str]:
    """Every run of the job in order (a requeued job has one row per run): 'REQUEUED', 'COMPLETED', ..."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--duplicates", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sacct_field(job_id: str, field: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", field], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def wait_job(job_id: str, timeout: float, describe=lambda: "") -> str:
    """Poll until the job left the queue and accounting shows a final state; that state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if states and states[-1] in TERMINAL and not in_queue(job_id):
            return states[-1]
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s (states {sacct_states(job_id)}); cancelled\n{describe()}")


def wait_for_text(path_glob: tuple[Path, str], pattern: str, timeout: float) -> bool:
    folder, glob = path_glob
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        for f in folder.glob(glob):
            try:
                if rx.search(f.read_text(errors="replace")):
                    return True
            except OSError:
                pass
        time.sleep(0.2)
    return False


def tails(*paths: Path, lines: int = 40) -> str:
    """The end of each log, for assertion messages."""
    out = []
    for p in paths:
        for f in sorted(p.parent.glob(p.name)):
            text = f.read_text(errors="replace").splitlines()
            out.append(f"--- {f}\n" + "\n".join(text[-lines:]))
    return "\n".join(out) or "(no logs)"
