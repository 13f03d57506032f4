"""Benchmark: converting real ~307M-parameter ZeRO checkpoints for another world size, and what the resume costs.

    .venv/bin/python -m bench.reshard [--work DIR] [--layers 26] [--repeats 3] [--keep] [--reuse]

The ~307M Llama of bench/consolidate.py trains 1 step with the zero2 and zero3 profiles on 2 CPU processes (the
real launcher). Then, per checkpoint, interleaved `--repeats` times, each in a fresh process (peak RSS from
wait4, the previous output deleted and synced, the ZeRO files read once so the page cache is warm):

- ours: `python -m tune_launch.training.zero_universal` (what a resume runs: the round-robin mapping fix and the
  check of every weight),
- the baseline: DeepSpeed's own `python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`,
- the floor: a raw copy (read + write + fsync) of the ZeRO optimizer files.

Correctness: every converted fp32 weight of each output compared with the checkpoint's own weights (ZeRO-2: the
model states; ZeRO-3: the Trainer's gathered model.safetensors; the model trains in fp32, so equal means equal).
Finally each checkpoint is resumed on 1 process through tune-launch for one step, converting, then once more
reusing the cached universal checkpoint. Writes bench/results/reshard.json and prints a markdown table.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
from bench import common as C  # noqa: E402  (run as `python -m bench.reshard` from the repository root)
from bench.consolidate import _settle, _warm, bench_model, machine, model_bench_arguments, raw_copy  # noqa: E402


def train_yaml(model_dir: Path, out: Path, steps: int) -> Path:
    import yaml

    cfg = {"model": {"name_or_path": str(model_dir)}, "task": "pretrain",
           "data": {"generate": {"kind": "pretrain", "train_samples": 64, "eval_samples": 8, "seed": 0}},
           "max_length": 32, "packing": True, "optim": {"learning_rate": 1e-4, "scheduler": "constant"},
           "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": steps, "precision": "fp32",
                     "gradient_checkpointing": False},
           "eval": {"eval_steps": 1000}, "checkpoint": {"save_steps": 1000 if steps > 1 else 1, "save_final_model": False},
           "output_dir": str(out), "seed": 0}
    path = out.parent / f"{out.name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(yaml_path: Path, profile: str, processes: int) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t = time.perf_counter()
    proc = subprocess.run([PY, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", str(processes), "--profile", profile,
                           str(yaml_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        sys.exit(f"{profile} on {processes} process(es) failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t, proc.stderr


def convert_once(argv: list[str], out: Path, files: list[Path]) -> dict:
    _settle(out)
    _warm(files)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "ok": ok, "log_tail": log.strip().splitlines()[-1:] if not ok else []}


def weight_errors(universal: Path, reference: dict) -> dict:
    """How many converted fp32 weights differ from the checkpoint's weights, and by how much at most."""
    import torch

    wrong, worst = [], 0.0
    for name, ref in reference.items():
        path = universal / "zero" / name / "fp32.pt"
        if not path.is_file():
            wrong.append(name)
            continue
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        got = (saved["param"] if isinstance(saved, dict) else saved).detach().flatten().float()  # ZeRO-3: a bare tensor
        diff = (got - ref.detach().flatten().float()).abs().max().item() if got.numel() == ref.numel() else float("inf")
        worst = max(worst, diff)
        if diff > 1e-6:
            wrong.append(name)
    return {"tensors": len(reference), "wrong_tensors": len(wrong), "max_abs_error": worst, "first_wrong": wrong[:3]}


def reference_weights(ckpt: Path, tag: str) -> dict:
    import torch
    from safetensors.torch import load_file

    model_states = ckpt / tag / "mp_rank_00_model_states.pt"
    if model_states.is_file():  # ZeRO-1/2: the full model is in the model states
        return torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)["module"]
    return load_file(ckpt / "model.safetensors")  # ZeRO-3: the Trainer's gathered model


def converters(ckpt: Path, tag: str, work: Path) -> list[tuple[str, list[str], Path]]:
    cpus = min(4, os.cpu_count() or 1)
    ours, stock = work / "ours" / f"{tag}_universal", work / "stock" / f"{tag}_universal"
    return [("tune-launch zero_universal (fix + check)",
             [PY, "-m", "tune_launch.training.zero_universal", str(ckpt / tag), str(ours), "--workers", str(cpus)], ours),
            ("deepspeed ds_to_universal",
             [PY, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag), "--output_folder", str(stock),
              "--inject_missing_state", "--num_extract_workers", str(cpus), "--num_merge_workers", str(min(2, cpus))], stock)]


def bench_checkpoint(profile: str, ckpt: Path, work: Path, repeats: int) -> dict:
    tag = (ckpt / "latest").read_text().strip()
    files = sorted((ckpt / tag).glob("*_optim_states.pt"))
    tools = converters(ckpt, tag, work)
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in tools}
    for _ in range(repeats):
        for name, argv, out in tools:
            out.parent.mkdir(parents=True, exist_ok=True)
            samples[name].append(convert_once(argv, out, files))
    reference = reference_weights(ckpt, tag)
    rows = []
    for name, argv, out in tools:
        runs = samples[name]
        walls = sorted(r["wall_s"] for r in runs)
        row = {"tool": name, "wall_s": round(statistics.median(walls), 2), "wall_samples_s": [round(w, 2) for w in walls],
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "ok": all(r["ok"] for r in runs),
               "log_tail": runs[-1]["log_tail"], "argv": [str(a).replace(str(ROOT) + "/", "") for a in argv]}
        row["weights"] = weight_errors(out, reference) if out.is_dir() else None
        print(f"  {name}: median {row['wall_s']:.2f} s of {walls}, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"ok {row['ok']}, weights {row['weights']}", flush=True)
        rows.append(row)
        shutil.rmtree(out.parent, ignore_errors=True)
    copy = raw_copy(files, work / "copy", repeats)
    print(f"  raw copy of {copy['bytes'] / 1e9:.2f} GB: median {copy['wall_s']:.2f} s", flush=True)
    return {"zero_bytes": copy["bytes"], "raw_copy": copy, "converters": rows}


def bench_resume(profile: str, model: Path, out: Path) -> dict:
    """The whole resume on 1 process (plan, start, convert, load, one step): converting, then reusing."""
    walls = {}
    for label in ("converting", "reusing"):
        wall, err = launch(train_yaml(model, out, 2), profile, 1)
        match = re.search(r"converted checkpoint-1 to a universal checkpoint in ([\d.]+) s", err)
        walls[label] = {"wall_s": round(wall, 1), "conversion_s": float(match.group(1)) if match else None,
                        "reused": "reusing the universal checkpoint" in err}
        shutil.rmtree(out / "checkpoint-2", ignore_errors=True)
        print(f"  resume on 1 process, {label}: {walls[label]}", flush=True)
    return walls


def main(argv: list[str] | None = None) -> int:
    args = model_bench_arguments(__doc__, "/tmp/tune-launch-bench-reshard", "converter", argv)
    work = args.work
    facts = bench_model(work, args.layers, args.reuse)
    results: dict = {**C.header("cpu"), "model": facts, "repeats": args.repeats, "load_average_start": os.getloadavg(),
                     "machine": machine(work),
                     "checkpoints": {}}
    for profile in ("zero2", "zero3"):
        out = work / f"run-{profile}"
        ckpt = out / "checkpoint-1"
        if args.reuse and (ckpt / "tune_launch_complete.json").is_file():
            train_s = None
        else:
            shutil.rmtree(out, ignore_errors=True)
            train_s, _ = launch(train_yaml(work / "model", out, 1), profile, 2)
            print(f"{profile}: trained 1 step on 2 processes and saved in {train_s:.0f} s", flush=True)
        for stale in ckpt.glob("global_step*_universal"):  # an earlier run's conversion: measure from the original
            shutil.rmtree(stale)
        (ckpt / "latest_universal").unlink(missing_ok=True)
        entry = bench_checkpoint(profile, ckpt, work / "conv", args.repeats)
        entry["train_and_save_s"] = None if train_s is None else round(train_s, 1)
        entry["resume_on_1_process"] = bench_resume(profile, work / "model", out)
        results["checkpoints"][profile] = entry
        shutil.rmtree(out / ".staging", ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    C.write_result(ROOT / "bench" / "results" / "reshard.json", results)
    print(table(results))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(r: dict) -> str:
    gib = 2**30
    lines = [f"Model: {r['model']['params'] / 1e6:.0f}M parameters, 2-process checkpoints, {r['machine']['cpus']} CPU cores "
             f"(load average {r['load_average_start'][0]:.1f} at the start).", "",
             "| checkpoint | tool | wall (s) | peak RSS (GiB) | weights wrong |", "|---|---|---|---|---|"]
    for profile, c in r["checkpoints"].items():
        for t in c["converters"]:
            w = t["weights"]
            wrong = f"{w['wrong_tensors']} of {w['tensors']}" if w else "failed"
            lines.append(f"| {profile} | {t['tool']} | {t['wall_s']:.1f} | {t['peak_rss_bytes'] / gib:.2f} | {wrong} |")
        lines.append(f"| {profile} | raw copy of the ZeRO files ({c['zero_bytes'] / 1e9:.2f} GB) | {c['raw_copy']['wall_s']:.1f} | - | - |")
    lines += ["", "| checkpoint | resume on 1 process | wall (s) | conversion (s) |", "|---|---|---|---|"]
    for profile, c in r["checkpoints"].items():
        for label, v in c["resume_on_1_process"].items():
            lines.append(f"| {profile} | {label} | {v['wall_s']:.0f} | {v['conversion_s'] if v['conversion_s'] else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
