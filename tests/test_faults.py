"""Fault injection on CPU with 2 real gloo ranks: fail fast naming the rank, SIGTERM -> checkpoint + clean exit,
kill -9 during saves -> resume from the newest complete checkpoint with exact continuation.

Each launch is the real `tune-launch --cpu --num-processes 2 --profile ddp` (about 10 s here).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tune_launch.training.faults import FaultSpec, FaultSpecError

ROOT = Path(__file__).resolve().parent.parent
FAIL_FAST_LIMIT_S = 60


def tiny_yaml(tmp: Path, out: Path, max_steps: int = 12, save_steps: int = 4, limit: int = 50) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        model:
          config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
                   num_key_value_heads: 2, max_position_embeddings: 128, tie_word_embeddings: true}}
        tokenizer: {{train_vocab_size: 300}}
        task: pretrain
        data: {{generate: {{kind: pretrain, train_samples: 400, eval_samples: 16, seed: 0}}}}
        max_length: 64
        optim: {{learning_rate: 3.0e-3, scheduler: constant}}
        train: {{micro_batch_size: 4, max_steps: {max_steps}, precision: fp32, gradient_checkpointing: false}}
        logging: {{logging_steps: 1}}
        eval: {{eval_steps: 1000}}
        checkpoint: {{save_steps: {save_steps}, save_total_limit: {limit}, save_final_model: true}}
        output_dir: {out}
        seed: 1
        """))
    return path


def launch(yaml_path: Path, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("TUNE_LAUNCH_FAULT", None) if not env_extra or "TUNE_LAUNCH_FAULT" not in env_extra else None
    return subprocess.Popen([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2", "--profile", "ddp",
                             str(yaml_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def newest_step(out: Path) -> int:
    from tune_launch.training.checkpoint import find_resume_checkpoint

    found = find_resume_checkpoint(out, warn=False)
    return int(found.name.split("-")[1]) if found else 0


def report(out_dir: Path) -> dict:
    return json.loads((out_dir / "run_report.json").read_text())


# --------------------------------------------------------------------------- fast, no processes

def test_fault_spec_parsing():
    assert FaultSpec.parse("rank=1,at=collective,step=3,how=kill") == FaultSpec(1, "collective", 3, "kill")
    assert FaultSpec.parse("at=save") == FaultSpec(0, "save", 1, "kill")
    for bad in ("rank=1,at=backward", "rank=x", "how=explode", "nonsense", "rank=1,when=3"):
        with pytest.raises(FaultSpecError):
            FaultSpec.parse(bad)


# --------------------------------------------------------------------------- fail fast

CASES = [
    ("data", "exit", 1),
    ("forward", "raise", 1),
    ("collective", "kill", 1),
    ("save", "kill", 0),
]


@pytest.mark.slow
@pytest.mark.parametrize("at,how,rank", CASES, ids=[f"{a}-{h}-rank{r}" for a, h, r in CASES])
def test_a_dying_rank_stops_the_job_fast_and_is_named(tmp_path, at, how, rank):
    out = tmp_path / "out"
    yaml_path = tiny_yaml(tmp_path, out, max_steps=12, save_steps=4)
    start = time.monotonic()
    proc = launch(yaml_path, {"TUNE_LAUNCH_FAULT": f"rank={rank},at={at},step=5,how={how}"})
    code, text = finish(proc, timeout=180)
    elapsed = time.monotonic() - start
    assert code != 0, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("tune-launch: error:")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith(f"tune-launch: error: rank {rank} (node 0) failed: "), errors[0]
    expected = {"exit": "exit code 3", "raise": "InjectedFault: injected fault at forward", "kill": "killed by SIGKILL"}[how]
    assert expected in errors[0]
    assert elapsed < FAIL_FAST_LIMIT_S, f"took {elapsed:.1f} s"
    from tune_launch.training.checkpoint import find_resume_checkpoint

    ckpt = find_resume_checkpoint(out)  # a save cut in half never shadows the complete one
    if at == "save":
        assert ckpt is None or ckpt.name == "checkpoint-4"
    print(f"{at}/{how}: exit {code} after {elapsed:.1f} s: {errors[0]}")


# --------------------------------------------------------------------------- signals

@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank"])
def test_sigterm_saves_one_checkpoint_and_exits_cleanly_then_resumes(tmp_path, target):
    import psutil

    out = tmp_path / "out"
    yaml_path = tiny_yaml(tmp_path, out, max_steps=400, save_steps=1000)
    proc = launch(yaml_path)
    deadline = time.monotonic() + 120
    while not any("step 3/" in f.read_text(errors="replace") for f in out.glob("logs/*") if f.is_file()):
        time.sleep(0.2)
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tune_launch.training.train" in p.cmdline()]
    victim = proc.pid if target == "launcher" else ranks[-1].pid
    sent = time.monotonic()
    os.kill(victim, signal.SIGTERM)
    code, text = finish(proc, timeout=150)
    elapsed = time.monotonic() - sent
    assert code == 0, text[-3000:]
    stopped = json.loads((out / "stopped_by_signal.json").read_text())
    step = stopped["step"]
    from tune_launch.training.checkpoint import inspect_checkpoint, list_checkpoints

    assert [s.path.name for s in list_checkpoints(out)] == [f"checkpoint-{step}"]  # exactly one, complete
    assert inspect_checkpoint(out / f"checkpoint-{step}").complete
    assert 0 < step < 400 and elapsed < 60
    assert not (out / "final").exists()  # stopped, not finished
    print(f"SIGTERM to {target}: checkpoint-{step}, clean exit after {elapsed:.1f} s")
    # the same command resumes from it
    yaml_path.write_text(yaml_path.read_text().replace("max_steps: 400", f"max_steps: {step + 3}"))
    code, text = finish(launch(yaml_path), timeout=180)
    assert code == 0, text[-3000:]
    rep = report(out)
    assert str(rep.get("resumed_from") or rep.get("resume") or "").endswith(f"checkpoint-{step}") or f"checkpoint-{step}" in text
    assert (out / "final").exists()


# --------------------------------------------------------------------------- kill -9 during saves

SAVER = r"""
import os, sys, json, time
from pathlib import Path
from tune_launch.training.checkpoint import seal, STAGING
out = Path(sys.argv[1])
step = int(sys.argv[2])
while True:
    staging = out / STAGING / f"checkpoint-{step}"
    staging.mkdir(parents=True, exist_ok=True)
    payload = bytes([step % 251]) * (4 * 1024 * 1024)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (staging / name).write_bytes(payload if name != "trainer_state.json" else json.dumps({"global_step": step}).encode())
    seal(staging, out / f"checkpoint-{step}", step)
    print(step, flush=True)
    step += 1
"""


def test_kill_9_during_atomic_saves_at_17_random_moments(tmp_path):
    """The save path itself (write, fsync, marker, rename), killed at random moments: resume always finds a
    complete checkpoint whose every file is intact."""
    from tune_launch.training.checkpoint import find_resume_checkpoint, list_checkpoints

    rng = random.Random(1234)
    out = tmp_path / "out"
    step = 1
    for moment in range(17):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out), str(step)], stdout=subprocess.PIPE, text=True)
        if moment == 0:
            assert proc.stdout.readline().strip() == "1"  # at least one complete save to fall back on
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait(timeout=10)
        newest = find_resume_checkpoint(out, warn=False)
        assert newest is not None
        n = int(newest.name.split("-")[1])
        assert (newest / "model.safetensors").read_bytes() == bytes([n % 251]) * (4 * 1024 * 1024)
        assert json.loads((newest / "trainer_state.json").read_text()) == {"global_step": n}
        step = max(s.step for s in list_checkpoints(out)) + 1 if list_checkpoints(out) else step


@pytest.mark.slow
def test_kill_9_whole_job_during_saves_then_resume_continues_exactly(tmp_path):
    """3 real kills (17 more in the test above: 20 moments) of launcher and both ranks while a checkpoint is being written; each resume picks the newest
    complete checkpoint, and the finished run matches an uninterrupted one step for step."""
    import psutil

    steps = 10
    ref_out = tmp_path / "ref"
    ref_yaml = tiny_yaml(tmp_path, ref_out, max_steps=steps, save_steps=1)
    code, text = finish(launch(ref_yaml))
    assert code == 0, text[-2000:]
    reference = dict((int(s), round(v, 6)) for s, v in report(ref_out)["train_losses"])

    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "out"
    yaml_path = tiny_yaml(tmp_path / "run", out, max_steps=steps, save_steps=1)
    rng = random.Random(99)
    killed_at = []
    for attempt in range(3):
        proc = launch(yaml_path)
        staging = out / ".staging"
        base = newest_step(out)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # a save in progress after >= 1 new complete one
            if newest_step(out) > base and staging.exists() and any(staging.glob("checkpoint-*")):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:
            break
        kill_tree(proc.pid)
        proc.communicate(timeout=30)
        killed_at.append(newest_step(out))  # read after the kill: a save may have sealed between the check and it
        for p in psutil.process_iter(["cmdline"]):
            assert str(yaml_path) not in " ".join(p.info["cmdline"] or []), "a rank survived kill -9 of the job"
    code, text = finish(launch(yaml_path))
    assert code == 0, text[-3000:]
    resumed = dict((int(s), round(v, 6)) for s, v in report(out)["train_losses"])
    assert len(killed_at) == 3 and killed_at == sorted(killed_at) and killed_at[0] >= 1, killed_at
    assert f"resuming from {out / f'checkpoint-{killed_at[-1]}'}" in text
    assert resumed and min(resumed) == killed_at[-1] + 1, (sorted(resumed), killed_at)
    for s, loss in resumed.items():
        assert loss == pytest.approx(reference[s], abs=1e-5), (s, loss, reference[s])
    print(f"killed -9 during saves; newest complete checkpoint each time {killed_at}; "
          f"final resume losses match the reference at steps {sorted(resumed)}")
