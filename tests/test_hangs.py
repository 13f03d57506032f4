"""Hangs on CPU with 2 real gloo ranks and the real launcher: a rank asleep inside a training step, one stopped
with SIGSTOP, one stuck inside a checkpoint save. Each time the job ends non-zero (124) within the stall limit
plus 30 s, the verdict names rank, node, phase and step, both ranks' stacks are in output_dir/logs/, and the
same command then resumes from the newest complete checkpoint and continues exactly. A slow data phase that
reports its progress runs longer than every limit without an alarm; `tune-launch status` follows it live and
reads the finished run. Limits are set short through the YAML's watchdog section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tune_launch.protocol import EXIT_STALLED
from tune_launch.training.checkpoint import find_resume_checkpoint, inspect_checkpoint

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 10  # watchdog.train_step_s / first_steps_s / save_s in these runs
STEPS = 12

pytestmark = pytest.mark.slow


def tiny_yaml(folder: Path, steps: int = STEPS) -> Path:
    from test_faults import tiny_yaml as faults_yaml

    path = faults_yaml(folder, folder / "out", max_steps=steps, save_steps=4)
    path.write_text(path.read_text() + f"watchdog: {{train_step_s: {LIMIT_S}, first_steps_s: {LIMIT_S}, save_s: {LIMIT_S}}}\n")
    return path


class Launch:
    """`tune-launch --cpu --num-processes 2 --profile ddp` with its output read line by line, each line timed."""

    def __init__(self, yaml_path: Path, fault: str | None = None, *overrides: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TUNE_LAUNCH_FAULT", None)
        if fault:
            env["TUNE_LAUNCH_FAULT"] = fault
        self.proc = subprocess.Popen([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2",
                                      "--profile", "ddp", str(yaml_path), *overrides], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            from test_faults import kill_tree

            kill_tree(self.proc.pid)
            pytest.fail(f"launch did not finish within {timeout} s:\n{self.text[-3000:]}")
        self.reader.join(timeout=10)
        return code


def losses(out: Path) -> dict[int, float]:
    return {int(s): round(v, 6) for s, v in json.loads((out / "run_report.json").read_text())["train_losses"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: the losses every resumed run must reproduce, and a finished run for `status`."""
    folder = tmp_path_factory.mktemp("reference")
    run = Launch(tiny_yaml(folder))
    assert run.finish() == 0, run.text[-3000:]
    return folder / "out"


def no_process_left(yaml_path: Path) -> None:
    import psutil

    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(yaml_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the job still run: {left}"


CASES = {
    # fault, the rank it hits, what the verdict must say, the culprit's frame in its stack
    "asleep-in-a-step": ("rank=1,at=forward,step=6,how=sleep", 1, "stalled in train step 6/12", "sleep_forever"),
    "stopped": ("rank=1,at=forward,step=6,how=stop", 1, "stalled in train step 6/12: process stopped (SIGSTOP)", "fire"),
    "stuck-in-a-save": ("rank=0,at=save,step=5,how=sleep", 0, "stalled in save checkpoint-8", "sleep_forever"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hung_rank_is_found_within_the_limit_named_with_every_stack_and_the_run_resumes_exactly(tmp_path, reference, case):
    fault, rank, says, frame = CASES[case]
    yaml_path = tiny_yaml(tmp_path)
    out = tmp_path / "out"
    run = Launch(yaml_path, fault)
    code = run.finish()
    hit, ended = run.when("TUNE_LAUNCH_FAULT: injecting"), time.monotonic()
    assert code == EXIT_STALLED, run.text[-4000:]
    assert hit is not None and ended - hit < LIMIT_S + 30, f"{ended - hit:.1f} s from the fault to the exit"
    errors = [line for _, line in run.lines if line.startswith("tune-launch: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"tune-launch: error: rank {rank} (node 0) {says}"), run.text[-4000:]
    assert "checkpoint-4, is kept" in errors[0]
    other = 1 - rank
    assert f"rank {other} (node 0, pid" in run.text and "waits in" in run.text  # where the other rank waits

    # every rank's stack in output_dir/logs/: the stall report, and the rank's own faulthandler file
    reports = sorted((out / "logs").glob("stall-*-node0.txt"))
    assert len(reports) == 1, sorted(p.name for p in (out / "logs").iterdir())
    report = reports[0].read_text()
    sections = {int(s.split(" ", 1)[0]): s for s in report.split("=== rank ")[1:]}
    assert sorted(sections) == [0, 1], report[:2000]
    assert frame in sections[rank] and "main thread" in sections[other], report[-4000:]
    if case != "stopped":  # a rank that can still run Python answers SIGUSR2 itself
        assert frame in (out / "heartbeat" / f"rank{rank}.stacks.txt").read_text()
    no_process_left(yaml_path)

    # the newest complete checkpoint is as it was; the same command resumes from it and continues exactly
    newest = find_resume_checkpoint(out, warn=False)
    assert newest is not None and newest.name == "checkpoint-4" and inspect_checkpoint(newest).complete
    again = Launch(yaml_path)
    assert again.finish() == 0, again.text[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in again.text
    resumed, ref = losses(out), losses(reference)
    assert min(resumed) == 5 and max(resumed) == STEPS, sorted(resumed)
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref[step], abs=1e-5), (step, loss, ref[step])
    print(f"{case}: exit {code} {ended - hit:.1f} s after the fault (limit {LIMIT_S} s): {errors[0]}")


def status(out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tune_launch.launch.cli", "status", str(out), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_slow_data_phase_that_reports_progress_never_stalls_and_status_follows_it(tmp_path, reference):
    """Rank 0 prepares data for 15 s (progress every second) while rank 1 waits in a barrier; every limit is
    shorter (data 3 s, steps 10 s). `tune-launch status` from another process sees the live run, then the end."""
    yaml_path = tiny_yaml(tmp_path, steps=60)
    out = tmp_path / "out"
    run = Launch(yaml_path, "rank=0,at=prepare,step=15,how=slow", "watchdog.data_s=3")
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 200
    while run.proc.poll() is None and time.monotonic() < deadline and len(seen) < 2:
        if (out / "heartbeat" / "rank0.json").exists():
            s = status(out)
            phase = s.get("phase", "")
            if "slow preparation" in phase and "data" not in seen and s["state"] == "running":
                seen["data"] = s
            if phase.startswith("train step") and s.get("loss") is not None and "train" not in seen:
                seen["train"] = s
        time.sleep(0.5)
    code = run.finish()
    assert code == 0 and "stall" not in run.text, run.text[-3000:]
    started, trained = run.when("slow' at the start of the data phase"), run.when("starting from step 0")
    assert started is not None and trained is not None and trained - started > 15 > 3  # longer than its limit

    data = seen.get("data")
    assert data is not None, seen
    assert data["phase"].startswith("data ") and "slow preparation" in data["phase"]
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and all(r["heartbeat_age_s"] < 15 for r in data["ranks"])
    assert data["ranks"][1]["phase"] == "data"  # waiting at the barrier, not progressing, not alarming
    train = seen.get("train")
    if train is not None:  # the 60 steps may be over between two polls on a fast machine
        assert train["state"] == "running" and train["tokens_per_s"] > 0 and train["seconds_left"] is not None

    done = status(out)
    assert done["state"] == "finished" and done["checkpoint"] == "checkpoint-60" and done["report"]["steps"] == 60
    assert {r["phase"] for r in done["ranks"]} == {"done"}
    finished = status(reference)
    assert finished["state"] == "finished" and finished["phase"] == f"done at step {STEPS}/{STEPS}" and finished["step"] == STEPS

