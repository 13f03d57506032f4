"""The memory plan against the measured peak, one GPU: full fine-tune with and without gradient
checkpointing, LoRA, QLoRA and 8-bit LoRA (LLM.int8), at two sequence lengths.

    python -m bench.memory                                  # 10 cases on the GPU, JSON in bench/results/
    python -m bench.memory --device cpu --tiny --cases full lora --steps 1   # smoke run (no measurement)

Each case runs in its own subprocess through the training path (training.model.build_model from a saved
random-init checkpoint of the TinyLlama-1.1B shape, training.trainer.arguments/build_trainer with the
perf.py decisions), `--steps` optimizer steps on packed rows, and reads torch.cuda.max_memory_reserved().
The prediction is launch.memory.estimate_memory for the single-gpu profile with the workload the launcher
would build (launch.plan.workload_for). The issue's bar: every case within +-10%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C  # run as `python -m bench.memory` from the repository root

CASES = ("full", "full_gc", "lora", "qlora", "lora-int8")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TOLERANCE = 0.10


def case_config(case: str, model_dir: str, seq_len: int, micro_batch: int, steps: int, out: str) -> dict[str, Any]:
    """The training YAML (as a mapping) of one case. Pure."""
    model: dict[str, Any] = {"name_or_path": model_dir}
    if case in ("lora", "qlora", "lora-int8"):
        model["lora"] = dict(LORA)
    if case == "qlora":
        model["quantization"] = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    if case == "lora-int8":
        model["quantization"] = {"load_in_8bit": True}
    return {
        "model": model, "data": {"train": {"path": "synthetic.jsonl"}}, "max_length": seq_len, "packing": True,
        "optim": {"learning_rate": 1e-4, "scheduler": "constant"},
        "train": {"micro_batch_size": micro_batch, "gradient_checkpointing": case == "full_gc", "max_steps": steps},
        "logging": {"logging_steps": 1}, "checkpoint": {"save_steps": 10**6, "save_final_model": False},
        "output_dir": out, "seed": 0,
    }


def predicted_bytes(cfg, facts, gpu_memory_gib: float) -> dict[str, float]:
    """What the launcher's memory model says for this config on one GPU, term by term."""
    from tune_launch.launch.memory import estimate_memory
    from tune_launch.launch.plan import workload_for
    from tune_launch.profiles import PROFILES
    from tune_launch.training.settings import DeviceFacts, resolve_settings

    dev = DeviceFacts(kind="cuda", bf16=True, memory_gib=gpu_memory_gib or 80.0)
    wl = workload_for(cfg, resolve_settings(cfg, dev, PROFILES["single-gpu"]), micro_batch=cfg.train.micro_batch_size,
                      checkpointing=cfg.train.gradient_checkpointing is True)
    est = estimate_memory(PROFILES["single-gpu"], facts, 1, 1, wl)
    terms = ("weights", "gradients", "optimizer", "gathered", "activations", "logits", "overhead")
    return {"total": est.total, **{t: getattr(est, t) for t in terms}}


def save_model(sh: dict[str, Any], path: Path) -> None:
    """A random-init checkpoint of the benchmark shape, in bf16 (what a hub checkpoint would be)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(sh)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).save_pretrained(str(path))


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from bench.throughput import _VocabOnly
    from tune_launch.launch.model_facts import model_facts
    from tune_launch.training.config import validate_config
    from tune_launch.training.distributed import RankInfo
    from tune_launch.training.model import build_model
    from tune_launch.training.packing import pack_best_fit
    from tune_launch.profiles import get_profile
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import MetricsCallback, arguments, build_trainer

    cuda = args.device == "cuda"
    sh = C.TINY if args.tiny else C.TINYLLAMA_1B
    with tempfile.TemporaryDirectory() as out:
        cfg = validate_config(case_config(case, args.model_dir, args.seq_len, args.micro_batch, args.steps, out), "bench")
        facts = model_facts(cfg.model)
        gib = 1024**3
        total_gib = torch.cuda.get_device_properties(0).total_memory / gib if cuda else 0.0
        pred = predicted_bytes(cfg, facts, total_gib)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        info = RankInfo(device=args.device, profile="single-gpu" if cuda else "cpu")
        dev = DeviceFacts.probe(args.device)
        settings = resolve_settings(cfg, dev, get_profile(info.profile))
        targs = TrainingArguments(**{**arguments(cfg, info, False, settings, dev), "disable_tqdm": True})
        model = build_model(cfg, _VocabOnly(sh["vocab_size"]), settings, dev)
        need = args.micro_batch * (args.steps + 1) * args.seq_len
        lengths = []
        seed = 0
        while sum(lengths) < need * 1.2:
            lengths += C.lognormal_lengths(256, median=min(200.0, args.seq_len / 8), max_len=args.seq_len, seed=seed)
            seed += 1
        docs = C.random_documents(lengths, sh["vocab_size"])
        rows = pack_best_fit([[1, *d, 2] for d in docs], args.seq_len, pad_id=0)
        metrics = MetricsCallback()
        trainer = build_trainer(cfg, info, targs, model, None, Dataset.from_list(rows), None, metrics, settings, dev)
        trainer.train()
        measured = torch.cuda.max_memory_reserved() if cuda else None
        allocated = torch.cuda.max_memory_allocated() if cuda else None
    err = None if measured is None else (pred["total"] - measured) / measured
    return {"case": case, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps,
            "predicted_gib": pred["total"] / gib, "predicted_terms_gib": {k: v / gib for k, v in pred.items()},
            "measured_reserved_gib": None if measured is None else measured / gib,
            "measured_allocated_gib": None if allocated is None else allocated / gib,
            "relative_error": err, "within_tolerance": None if err is None else abs(err) <= TOLERANCE,
            "losses": [loss for _, loss in metrics.train_losses]}


def run_all(args: argparse.Namespace) -> int:
    head = C.header(args.device)
    sh = C.TINY if args.tiny else C.TINYLLAMA_1B
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(sh, model_dir)
        for seq_len, mb in zip(args.seq_lens, args.micro_batches):
            for case in args.cases:
                if case == "qlora" and args.device != "cuda":
                    rows.append({"case": case, "seq_len": seq_len, "skipped": "QLoRA trains only on a CUDA GPU"})
                    continue
                rows.append(_subprocess_case(case, seq_len, mb, str(model_dir), args))
    data = {**head, "benchmark": "memory", "tolerance": TOLERANCE, "profile": "single-gpu", "results": rows,
            "all_within_tolerance": all(r.get("within_tolerance") for r in rows if "error" not in r and "skipped" not in r)
            if args.device == "cuda" else None}
    path = C.write_result(C.result_path("memory" + ("-tiny" if args.tiny else ""), head["device"], head["date"],
                                        Path(args.out_dir) if args.out_dir else None), data)
    table = [dict(r, variant=f"{r['case']} @ {r['seq_len']}") for r in rows if "error" not in r and "skipped" not in r]
    print(C.markdown_table(table, [("variant", "case", ""), ("micro_batch", "micro batch", ""),
                                   ("predicted_gib", "plan GiB", ".2f"), ("measured_reserved_gib", "measured GiB", ".2f"),
                                   ("relative_error", "error", "+.1%")]))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def _subprocess_case(case: str, seq_len: int, mb: int, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res_file = f.name
    cmd = [sys.executable, "-m", "bench.memory", "--worker", case, "--json-out", res_file,
           "--model-dir", model_dir, "--seq-len", str(seq_len), "--micro-batch", str(mb), "--steps", str(args.steps),
           "--device", args.device] + (["--tiny"] if args.tiny else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout, cwd=C.ROOT)
        row = json.loads(Path(res_file).read_text()) if proc.returncode == 0 else \
            {"case": case, "seq_len": seq_len, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    except subprocess.TimeoutExpired:
        row = {"case": case, "seq_len": seq_len, "error": f"timed out after {args.case_timeout} s"}
    finally:
        Path(res_file).unlink(missing_ok=True)
    row["wall_s"] = time.perf_counter() - t0
    print(f"{case} @ {seq_len}: " + (row["error"][-300:] if "error" in row else
          f"plan {row['predicted_gib']:.2f} GiB, measured {row['measured_reserved_gib'] or float('nan'):.2f} GiB"),
          file=sys.stderr, flush=True)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke runs)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--seq-lens", nargs="+", type=int, default=None, help="default 512 2048 (tiny: 64 128)")
    p.add_argument("--micro-batches", nargs="+", type=int, default=None, help="one per sequence length (default 8 4)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--case-timeout", type=int, default=240)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_lens = args.seq_lens or ([64, 128] if args.tiny else [512, 2048])
    args.micro_batches = args.micro_batches or [8, 4][: len(args.seq_lens)] + [4] * max(0, len(args.seq_lens) - 2)
    if len(args.micro_batches) != len(args.seq_lens):
        p.error(f"--micro-batches: give one per --seq-lens value ({len(args.seq_lens)}), got {len(args.micro_batches)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.json_out).write_text(json.dumps(run_case(args.worker, args)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU; use --device cpu --tiny for a smoke run", file=sys.stderr)
            return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
