"""Benchmark: `tune-launch consolidate` vs zero_to_fp32 and `accelerate merge-weights` on real 300M checkpoints.

    .venv/bin/python -m bench.consolidate [--work DIR] [--layers 26] [--repeats 3]

Makes a random ~307M-parameter Llama (26 layers, hidden 1024, vocab = its 300-token local tokenizer),
trains it 1 step with the zero3 and fsdp profiles on 2 CPU processes (the real launcher), then times
each tool on the same checkpoint in a fresh process and reads its peak RSS from wait4(). This driver
never imports torch itself (the model is made in a child), so a forked child's RSS before exec cannot
inflate the figures. The disk's raw copy speed (read + write + fsync of the checkpoint's shard files)
is the ceiling. All tools write fp32 safetensors, so bytes in = bytes out.

Fair conditions, the same for every tool and the raw copy: the previous output is deleted and
`sync`ed, the checkpoint's shard files are read once so the page cache is warm (as right after
training), and each tool runs `--repeats` times, interleaved with the others so that a slow moment of
this VM's disk hits all of them alike; tables give the median, the JSON every sample.
Writes bench/results/consolidate.json and prints a markdown table (copied into docs/consolidate.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
from bench import common as C  # noqa: E402  (run as `python -m bench.consolidate` from the repository root)


def make_model(folder: Path, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune_launch.training.synthetic import pretrain_texts, train_tokenizer

    tok = train_tokenizer([r["text"] for r in pretrain_texts(200, 0)], vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"params": n, "largest_tensor_bytes": largest, "fp32_bytes": n * 4}


def train(model_dir: Path, out: Path, profile: str) -> float:
    import yaml

    cfg = {"model": {"name_or_path": str(model_dir)}, "task": "pretrain",
           "data": {"generate": {"kind": "pretrain", "train_samples": 64, "eval_samples": 8, "seed": 0}},
           "max_length": 32, "packing": True,
           "optim": {"learning_rate": 1e-4, "scheduler": "constant"},
           "train": {"micro_batch_size": 1, "max_steps": 1, "precision": "fp32", "gradient_checkpointing": False},
           "eval": {"eval_steps": 1000}, "checkpoint": {"save_steps": 1, "save_final_model": False},
           "output_dir": str(out), "seed": 0}
    path = out.parent / f"{profile}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    t = time.perf_counter()
    proc = subprocess.run([PY, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2", "--profile", profile, str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"training {profile} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t


def _warm(files: list[Path]) -> None:
    """Read the shard files once so every tool starts from the same warm page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _settle(out: Path) -> None:
    """No leftovers from the previous run: its output deleted and every dirty page written back."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def measure_once(name: str, argv: list[str], out: Path, shards: list[Path]) -> dict:
    """Wall time and peak RSS (this child alone, from wait4) of one tool writing into `out`."""
    _settle(out)
    _warm(shards)
    env = dict(os.environ)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed:\n{log[-3000:]}")
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors")) if out.exists() else 0
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "output_bytes": size}


def measure(tools: list[tuple[str, list[str], Path]], shards: list[Path], repeats: int) -> list[dict]:
    """Each tool `repeats` times, interleaved; median wall, largest peak RSS, every sample kept."""
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in tools}
    for _ in range(repeats):
        for name, argv, out in tools:
            samples[name].append(measure_once(name, argv, out, shards))
    results = []
    for name, argv, out in tools:
        runs = samples[name]
        walls = sorted(r["wall_s"] for r in runs)
        result = {"tool": name, "wall_s": round(statistics.median(walls), 2), "wall_samples_s": [round(w, 2) for w in walls],
                  "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "output_bytes": runs[-1]["output_bytes"],
                  "argv": [str(a).replace(str(ROOT) + "/", "") for a in argv]}
        print(f"  {name}: median {result['wall_s']:.2f} s of {walls}, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
        results.append(result)
    return results


def raw_copy(files: list[Path], dst: Path, repeats: int) -> dict:
    """Read + write + fsync of the checkpoint's shard files: what any converter must at least do (median)."""
    walls = []
    for _ in range(repeats):
        _settle(dst)
        _warm(files)
        dst.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        for f in files:
            target = dst / f.name
            shutil.copyfile(f, target)
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
        walls.append(time.perf_counter() - t)
    shutil.rmtree(dst)
    total = sum(f.stat().st_size for f in files)
    wall = statistics.median(walls)
    return {"bytes": total, "wall_s": round(wall, 2), "wall_samples_s": sorted(round(w, 2) for w in walls),
            "bytes_per_s": total / wall}


def _filesystem(path: Path) -> str:
    """The filesystem type of `path` (from /proc/mounts: the longest mount point containing it)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def bench_model(work: Path, layers: int, reuse: bool) -> dict:
    """The benchmark's model in work/model (made in a fresh process, or reused from a --keep run); its facts."""
    facts_file = work / "model" / "bench-facts.json"
    if not (reuse and facts_file.is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        made = subprocess.run([PY, "-m", "bench.consolidate", "--make-model", str(work / "model"), str(layers)], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        if made.returncode != 0:
            sys.exit(f"making the model failed:\n{made.stderr[-3000:]}")
        facts_file.write_text(made.stdout.strip().splitlines()[-1])
    facts = json.loads(facts_file.read_text())
    print(f"model: {facts['params'] / 1e6:.0f}M parameters", flush=True)
    return facts


def model_bench_arguments(doc: str, work: str, per: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of the benchmarks that train the 307M model first (this one and bench/reshard.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(work))
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--repeats", type=int, default=3, help=f"runs per {per} (the median is reported)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--reuse", action="store_true", help="reuse the model and checkpoints a --keep run left in --work")
    return p.parse_args(argv)


def machine(work: Path) -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "filesystem": _filesystem(work)}


def main(argv: list[str] | None = None) -> int:
    args = model_bench_arguments(__doc__, "/tmp/tune-launch-bench-consolidate", "tool", argv)
    work = args.work
    facts = bench_model(work, args.layers, args.reuse)
    results: dict = {**C.header("cpu"), "model": facts, "repeats": args.repeats, "machine": machine(work),
                     "checkpoints": {}}
    for profile in ("zero3", "fsdp"):
        out = work / f"run-{profile}"
        ckpt = out / "checkpoint-1"
        if args.reuse and (ckpt / "tune_launch_complete.json").is_file():
            train_s = None
            print(f"{profile}: reusing {ckpt}", flush=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            train_s = train(work / "model", out, profile)
            print(f"{profile}: trained 1 step and saved in {train_s:.0f} s", flush=True)
        shards = sorted((ckpt / "global_step1").glob("*_optim_states.pt")) if profile == "zero3" \
            else sorted((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))
        copy = raw_copy(shards, work / "copy", args.repeats)
        print(f"  raw copy: median {copy['wall_s']:.2f} s of {copy['wall_samples_s']}", flush=True)
        def consolidate(dst: Path, *extra: str) -> list[str]:
            return [PY, "-m", "tune_launch.launch.cli", "consolidate", str(ckpt), str(dst), "--dtype", "fp32", "--quiet",
                    "--max-shard-size", "5GB", "--config", str(work / "model"), *extra]

        if profile == "zero3":
            reference = ("zero_to_fp32", [PY, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(work / "ref"),
                                          "--safe_serialization"], work / "ref")
        else:
            reference = ("accelerate merge-weights", [str(Path(PY).parent / "accelerate"), "merge-weights",
                                                      str(ckpt / "pytorch_model_fsdp_0"), str(work / "ref")], work / "ref")
        ours, verify, ref = measure([("tune-launch consolidate", consolidate(work / "ours"), work / "ours"),
                                     ("tune-launch consolidate --verify", consolidate(work / "ours-verify", "--verify"),
                                      work / "ours-verify"),
                                     reference], shards, args.repeats)
        ours["throughput_bytes_per_s"] = facts["fp32_bytes"] / ours["wall_s"]
        limit = 2**30 + 2 * facts["largest_tensor_bytes"]
        results["checkpoints"][profile] = {
            "shard_bytes": copy["bytes"], "train_and_save_s": None if train_s is None else round(train_s, 1), "raw_copy": copy,
            "tools": [ours, verify, ref],
            "targets": {
                "peak_rss_limit_bytes": limit, "peak_rss_ok": ours["peak_rss_bytes"] <= limit,
                "speedup_vs_reference": round(ref["wall_s"] / ours["wall_s"], 2),
                "speedup_ok": ref["wall_s"] / ours["wall_s"] >= (3 if profile == "zero3" else 1),
                "throughput_fraction_of_raw_copy": round(ours["throughput_bytes_per_s"] / copy["bytes_per_s"], 2),
                "throughput_ok": ours["throughput_bytes_per_s"] >= 0.5 * copy["bytes_per_s"],
            },
        }
        shutil.rmtree(out / ".staging", ignore_errors=True)
    dest = ROOT / "bench" / "results" / "consolidate.json"
    dest.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(table(results))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(r: dict) -> str:
    gib = 2**30
    lines = [f"Model: {r['model']['params'] / 1e6:.0f}M parameters (fp32 {r['model']['fp32_bytes'] / 1e9:.2f} GB, largest "
             f"tensor {r['model']['largest_tensor_bytes'] / 1e6:.0f} MB), {r['machine']['cpus']} CPU cores.", "",
             "| checkpoint | tool | wall (s) | peak RSS (GiB) | throughput (GB/s) |", "|---|---|---|---|---|"]
    for name, c in r["checkpoints"].items():
        lines.append(f"| {name} | raw copy of the shard files ({c['raw_copy']['bytes'] / 1e9:.2f} GB, read + write + fsync) "
                     f"| {c['raw_copy']['wall_s']} | - | {c['raw_copy']['bytes_per_s'] / 1e9:.2f} |")
        for t in c["tools"]:
            tp = r["model"]["fp32_bytes"] / t["wall_s"] / 1e9
            lines.append(f"| {name} | {t['tool']} | {t['wall_s']} | {t['peak_rss_bytes'] / gib:.2f} | {tp:.2f} |")
        g = c["targets"]
        lines.append(f"| {name} | targets | {g['speedup_vs_reference']}x faster ({'ok' if g['speedup_ok'] else 'MISSED'}) "
                     f"| limit {g['peak_rss_limit_bytes'] / gib:.2f} ({'ok' if g['peak_rss_ok'] else 'MISSED'}) "
                     f"| {g['throughput_fraction_of_raw_copy']} of raw copy ({'ok' if g['throughput_ok'] else 'MISSED'}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make-model":
        print(json.dumps(make_model(Path(sys.argv[2]), int(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
