"""Training throughput of tune-launch's training path against plain Hugging Face Trainer, side by side.

    python -m bench.throughput                      # all variants on the GPU, JSON in bench/results/
    python -m bench.throughput --device cpu --tiny --steps 2 --warmup 1   # smoke run, under a minute

Model: the TinyLlama-1.1B shape, random init (`--tiny`: a 2-layer toy). Data: random token documents with
log-normal lengths (median 200, sigma 1, clipped at 2048), the same documents for every variant. Each variant
runs in its own subprocess (clean CUDA memory and compile caches): `--warmup` untimed steps, then `--steps`
timed ones. Real tokens are the ones that carry loss (labels after the shift, not -100); MFU = 6 x params x
real tokens/s / peak dense bf16 FLOP/s of the device.

Variants: the plain-Trainer baselines of ../shared/gpu/README.md (`pad1024`, `packed`, `packed_fused`,
`packed_fused_compile`) and the training path itself (`ours`: training.model.build_model +
training.trainer.arguments/build_trainer with training/perf.py's decisions and the launcher planner's micro
batch), plus `ours_compile` / `ours_sdpa` that flip one decision to show what it is worth.
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

from bench import common as C  # run as `python -m bench.throughput` from the repository root

BASELINES = ("pad1024", "packed", "packed_fused", "packed_fused_compile")
OURS = ("ours", "ours_compile", "ours_sdpa")
DEFAULT_VARIANTS = ("pad1024", "packed", "packed_fused", "packed_fused_compile", "ours", "ours_compile")
DESCRIPTIONS = {
    "pad1024": "plain Trainer: pad every sample to 1024, batch 4, fp32 weights + bf16 autocast",
    "pad_longest": "plain Trainer: pad to longest in batch, batch 8, fp32 weights + bf16 autocast",
    "packed": "plain Trainer: packed to 2048 (cross-document attention), batch 8",
    "packed_fused": "plain Trainer: packed + fused AdamW",
    "packed_fused_compile": "plain Trainer: packed + fused AdamW + torch.compile",
    "ours": "tune-launch training path, auto decisions (training/perf.py + memory plan)",
    "ours_compile": "tune-launch training path, auto decisions + torch.compile forced on",
    "ours_sdpa": "tune-launch training path, auto decisions but sdpa (block-diagonal mask) attention",
}


# --------------------------------------------------------------------------- data (pure)

def shape(tiny: bool) -> dict[str, Any]:
    """Model config, sequence length and document length distribution for the run."""
    if tiny:
        return {"model": C.TINY, "seq_len": 128, "pad_len": 64, "median": 20.0, "max_doc": 128}
    return {"model": C.TINYLLAMA_1B, "seq_len": 2048, "pad_len": 1024, "median": 200.0, "max_doc": 2048}


def documents(sh: dict[str, Any], tokens_needed: int, seed: int = 0) -> list[list[int]]:
    """Enough random documents for `tokens_needed` packed tokens (lengths drawn until the total is reached)."""
    lengths: list[int] = []
    batch = 0
    while sum(lengths) < tokens_needed:
        lengths += C.lognormal_lengths(512, median=sh["median"], max_len=sh["max_doc"], seed=seed + batch)
        batch += 1
    return C.random_documents(lengths, sh["model"]["vocab_size"], seed)


def padded_rows(docs: list[list[int]], length: int, pad_id: int = 0) -> list[dict[str, list[int]]]:
    """Tutorial style: every document truncated/padded to `length`, attention mask, labels -100 on padding."""
    rows = []
    for d in docs:
        d = d[:length]
        n = length - len(d)
        rows.append({"input_ids": d + [pad_id] * n, "attention_mask": [1] * len(d) + [0] * n,
                     "labels": d + [-100] * n})
    return rows


def grouped_rows(docs: list[list[int]], length: int, eos_id: int = 2) -> list[dict[str, list[int]]]:
    """Tutorial packing (`group_texts`): concatenate with EOS, cut into rows; attention crosses documents."""
    flat = [t for d in docs for t in (*d, eos_id)]
    return [{"input_ids": flat[i:i + length], "labels": flat[i:i + length]}
            for i in range(0, len(flat) - length + 1, length)]


# --------------------------------------------------------------------------- worker (one variant, one process)

class TokenCounter:
    """Wraps a collator; remembers (loss tokens, token slots, positions that could carry loss) of each batch,
    in the order the batches are made (the order the Trainer consumes them)."""

    def __init__(self, base) -> None:
        self.base = base
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, features):
        batch = self.base(features)
        rows, cols = batch["input_ids"].shape
        self.batches.append((C.loss_tokens(batch["labels"]), rows * cols, rows * (cols - 1)))
        return batch


def _timer(device: str, warmup: int, steps: int):
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        t0 = t1 = None
        losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                sync()
                Timer.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup + steps:
                sync()
                Timer.t1 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                Timer.losses.append(float(logs["loss"]))

    return Timer()


def _baseline_trainer(variant: str, args: argparse.Namespace, sh: dict[str, Any], docs, out: str):
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    cfg = dict(sh["model"])
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)  # fp32 weights, bf16 autocast
    if variant == "pad1024":
        rows, batch = padded_rows(docs, sh["pad_len"]), 4
    else:
        rows, batch = grouped_rows(docs, sh["seq_len"]), 8
    cuda = args.device == "cuda"
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=args.warmup + args.steps,
        learning_rate=2e-5, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if "fused" in variant else "adamw_torch",
        torch_compile="compile" in variant, remove_unused_columns=False, disable_tqdm=True, seed=0)
    return Trainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator), batch


def _ours_trainer(variant: str, args: argparse.Namespace, sh: dict[str, Any], docs, out: str):
    """The training path: typed config -> perf decisions -> build_model -> arguments -> build_trainer."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from tune_launch.launch.model_facts import model_facts
    from tune_launch.training.config import validate_config
    from tune_launch.training.packing import pack_best_fit
    from tune_launch.training.distributed import RankInfo
    from tune_launch.training.model import build_model
    from tune_launch.launch.plan import plan_batch
    from tune_launch.profiles import get_profile
    from tune_launch.training.perf import decide
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import MetricsCallback, arguments, build_trainer

    raw = {
        "model": {"config": dict(sh["model"])},
        "tokenizer": {"train_vocab_size": sh["model"]["vocab_size"]},
        "data": {"train": {"path": "synthetic.jsonl"}},
        "max_length": sh["seq_len"], "packing": True,
        "optim": {"learning_rate": 2e-5, "scheduler": "constant"},
        "train": {"micro_batch_size": "auto", "gradient_checkpointing": "auto", "max_steps": args.warmup + args.steps},
        "logging": {"logging_steps": 1}, "checkpoint": {"save_steps": 10**6, "save_final_model": False},
        "output_dir": out, "seed": 0,
    }
    if variant == "ours_compile":
        raw["train"]["torch_compile"] = True
    if variant == "ours_sdpa":
        raw["model"]["attn_implementation"] = "sdpa"
    cfg = validate_config(raw, "bench")
    dev = DeviceFacts.probe(args.device)
    mb, gc = plan_batch(cfg, dev, model_facts(cfg.model))  # what the launcher's planner resolves `auto` to
    if args.micro_batch:
        mb = args.micro_batch
    train = dict(raw["train"], micro_batch_size=mb, gradient_checkpointing=gc)
    cfg = validate_config({**raw, "train": train}, "bench")
    info = RankInfo(device=args.device, profile="single-gpu" if args.device == "cuda" else "cpu")
    settings = resolve_settings(cfg, dev, get_profile(info.profile))
    targs = TrainingArguments(**{**arguments(cfg, info, False, settings, dev), "disable_tqdm": True})
    model = build_model(cfg, _VocabOnly(sh["model"]["vocab_size"]), settings, dev)
    rows = pack_best_fit([[1, *d, 2] for d in docs], cfg.max_length, pad_id=0)  # bos ... eos, as pretrain_dataset
    trainer = build_trainer(cfg, info, targs, model, None, Dataset.from_list(rows), None, MetricsCallback(), settings, dev)
    plan = decide(cfg, dev, info.profile, settings)
    return trainer, mb, {"perf": plan.reasons, "gradient_checkpointing": gc, "attn": plan.attn_implementation,
                         "packing": "best-fit decreasing (training/packing.py)"}


class _VocabOnly:
    """What build_model reads from a tokenizer when training from scratch."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def run_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sh = shape(args.tiny)
    per_step = 8 * sh["seq_len"] * (args.micro_batch or 16) // 8
    docs = documents(sh, int(per_step * (args.warmup + args.steps + 2) * 1.2), seed=args.seed)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        extra: dict[str, Any] = {}
        if variant in OURS:
            trainer, batch, extra = _ours_trainer(variant, args, sh, docs, out)
        else:
            trainer, batch = _baseline_trainer(variant, args, sh, docs, out)
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        timer = _timer(args.device, args.warmup, args.steps)
        trainer.add_callback(timer)
        params = sum(p.numel() for p in trainer.model.parameters())
        trainer.train()
    timed = counter.batches[args.warmup:args.warmup + args.steps]
    real, computed, slots = (sum(b[i] for b in timed) for i in range(3))
    seconds = (timer.t1 or 0.0) - (timer.t0 or 0.0)
    tps = real / seconds if seconds > 0 else 0.0
    peak = C.peak_flops(C.device_name(args.device)) if cuda else None
    gib = 1024**3
    return {
        "variant": variant, "description": DESCRIPTIONS[variant], "params": params, "micro_batch": batch,
        "timed_steps": len(timed), "seconds": seconds, "real_tokens": real, "computed_tokens": computed,
        "tokens_per_s": tps, "padding": C.padding_fraction(real, slots), "mfu": C.mfu(params, tps, peak),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if cuda else None,
        "first_loss": timer.losses[0] if timer.losses else None, "last_loss": timer.losses[-1] if timer.losses else None,
        **extra,
    }


# --------------------------------------------------------------------------- parent (all variants)

def summarize(rows: list[dict[str, Any]], peak: float | None, params: int | None) -> dict[str, Any]:
    """Speed-ups of `ours` over the best and the padded baseline, and the issue's targets. Pure."""
    ok = {r["variant"]: r for r in rows if "error" not in r}
    base = [ok[v] for v in BASELINES if v in ok]
    best = max(base, key=lambda r: r["tokens_per_s"], default=None)
    ours = ok.get("ours")
    out: dict[str, Any] = {"best_baseline": best["variant"] if best else None}
    if ours and best and best["tokens_per_s"]:
        out["speedup_vs_best_baseline"] = ours["tokens_per_s"] / best["tokens_per_s"]
    if ours and "pad1024" in ok and ok["pad1024"]["tokens_per_s"]:
        out["speedup_vs_pad1024"] = ours["tokens_per_s"] / ok["pad1024"]["tokens_per_s"]
    if ours:
        out["ours_mfu"] = ours.get("mfu")
        out["targets"] = {
            "mfu_at_least_0.45": None if ours.get("mfu") is None else ours["mfu"] >= 0.45,
            "speedup_vs_best_at_least_1.3": None if "speedup_vs_best_baseline" not in out else out["speedup_vs_best_baseline"] >= 1.3,
            "speedup_vs_pad1024_at_least_10": None if "speedup_vs_pad1024" not in out else out["speedup_vs_pad1024"] >= 10,
        }
        if peak and params:
            out["tokens_per_s_for_45pct_mfu"] = C.tokens_per_s_for_mfu(params, 0.45, peak)
    return out


TABLE = [("variant", "variant", ""), ("tokens_per_s", "real tokens/s", ",.0f"), ("padding", "padding", ".0%"),
         ("mfu", "MFU", ".1%"), ("peak_reserved_gib", "peak GiB (reserved)", ".1f"), ("micro_batch", "micro batch", "")]


def run_all(args: argparse.Namespace, argv_tail: list[str]) -> int:
    head = C.header(args.device)
    rows = []
    for v in args.variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            res_file = f.name
        cmd = [sys.executable, "-m", "bench.throughput", "--worker", v, "--json-out", res_file, *argv_tail]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout, cwd=C.ROOT)
            if proc.returncode == 0:
                row = json.loads(Path(res_file).read_text())
            else:
                row = {"variant": v, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
        except subprocess.TimeoutExpired:
            row = {"variant": v, "error": f"timed out after {args.variant_timeout} s"}
        finally:
            Path(res_file).unlink(missing_ok=True)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{v}: " + (row["error"][-300:] if "error" in row else f"{row['tokens_per_s']:,.0f} real tokens/s"),
              file=sys.stderr, flush=True)
    params = next((r["params"] for r in rows if "params" in r), None)
    data = {**head, "benchmark": "throughput", "tiny": args.tiny, "warmup_steps": args.warmup, "timed_steps": args.steps,
            "lengths": {"distribution": "log-normal", "median": shape(args.tiny)["median"], "sigma": 1.0,
                        "clip": shape(args.tiny)["max_doc"]},
            "results": rows, "summary": summarize(rows, head["peak_bf16_flops"], params)}
    path = C.write_result(C.result_path("throughput" + ("-tiny" if args.tiny else ""), head["device"], head["date"],
                                        Path(args.out_dir) if args.out_dir else None), data)
    print(C.markdown_table([r for r in rows if "error" not in r], TABLE))
    print(json.dumps(data["summary"], indent=1))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model and short documents (smoke runs)")
    p.add_argument("--steps", type=int, default=22, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compile, allocator warm-up)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(DESCRIPTIONS))
    p.add_argument("--micro-batch", type=int, default=None, help="force the micro batch of the ours* variants")
    p.add_argument("--variant-timeout", type=int, default=300, help="seconds per variant subprocess")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        res = run_worker(args.worker, args)
        Path(args.json_out).write_text(json.dumps(res))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU; use --device cpu --tiny for a smoke run", file=sys.stderr)
            return 2
    tail = [a for a in _strip(argv, "--variants")]
    return run_all(args, tail)


def _strip(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and its values (the workers get one variant each)."""
    out, skip = [], False
    for a in argv:
        if a == flag:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
