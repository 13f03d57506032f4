"""`tune-launch consolidate CHECKPOINT OUT`: a thin adapter over `consolidate_checkpoint`.

Reads an FSDP sharded checkpoint (torch.distributed.checkpoint) or a DeepSpeed ZeRO-1/2/3 checkpoint and
writes a Hugging Face folder (sharded safetensors + index, config, tokenizer), one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from tune_launch.launch.consolidation import consolidate_checkpoint

EPILOG = """examples:
  tune-launch consolidate outputs/run/checkpoint-500 outputs/run/hf --dtype bf16
  tune-launch consolidate outputs/lora/checkpoint-200 outputs/lora/merged --merge-lora --verify
peak memory stays near the largest tensor; output is written to a temporary folder and renamed on success."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.epilog = EPILOG
    p.add_argument("checkpoint", help="checkpoint folder: checkpoint-N (FSDP or DeepSpeed), pytorch_model_fsdp_0, or global_stepN")
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype (default auto: the dtype in the model's config.json, else fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA adapters into the base weights (default for LoRA checkpoints: write a PEFT adapter folder)")
    p.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor with the checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only after the new output is complete)")
    p.add_argument("--config", dest="config_dir", default=None,
                   help="folder with the model's config.json/tokenizer when not next to the checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run_from_args(args: argparse.Namespace) -> int:
    result = consolidate_checkpoint(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    merge_lora=args.merge_lora, verify=args.verify, force=args.force,
                                    config_dir=args.config_dir, progress=None if (args.quiet or args.json) else sys.stderr)
    print(json.dumps(result.to_json(), indent=1, sort_keys=True) if args.json else result.summary(), flush=True)
    return 0


def finished_report(cfg, started_at: float) -> dict | None:
    """run_report.json of a run that finished in this launch (rank 0 writes it at the very end, which a run stopped
    by a signal, to checkpoint and exit for a requeue, never reaches); None otherwise."""
    report = Path(cfg.output_dir) / "run_report.json"
    if not report.is_file() or report.stat().st_mtime < started_at:
        return None
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_to_consolidate(cfg, report: dict) -> tuple[Path | None, str]:
    """consolidate.checkpoint: the best checkpoint the run report names, or the newest complete one; and a phrase
    saying which it is."""
    from tune_launch.training.checkpoint import find_resume_checkpoint, inspect_checkpoint

    best = report.get("best") or {}
    if cfg.consolidate.checkpoint == "best":
        folder = Path(best["checkpoint"]) if best.get("checkpoint") else None
        if folder is not None and inspect_checkpoint(folder).complete:
            return folder, f"the best checkpoint ({best['metric']} {best['value']:.4f} at step {best['step']})"
        newest = find_resume_checkpoint(Path(cfg.output_dir), warn=False)
        return newest, "the newest checkpoint (no best checkpoint was recorded: did an evaluation run?)"
    return find_resume_checkpoint(Path(cfg.output_dir), warn=False), "the newest checkpoint"


def consolidate_finished_run(cfg, started_at: float, stream: TextIO = sys.stderr) -> Path | None:
    """consolidate.enabled: after every rank has exited cleanly, stream the run's best or newest checkpoint
    (consolidate.checkpoint) into HF safetensors at output_dir/consolidated (on the launcher, so no rank waits in
    a barrier meanwhile). Only a run that finished does so (`finished_report`)."""
    report = finished_report(cfg, started_at)
    if report is None:
        return None
    out = Path(cfg.output_dir)
    checkpoint, which = checkpoint_to_consolidate(cfg, report)
    if checkpoint is None:
        print("[tune-launch] consolidate.enabled: no complete checkpoint to consolidate", file=stream, flush=True)
        return None
    print(f"[tune-launch] consolidating {which}: {checkpoint}", file=stream, flush=True)
    c = cfg.consolidate
    result = consolidate_checkpoint(checkpoint, out / "consolidated", dtype=c.dtype, max_shard_size=c.max_shard_size,
                                    merge_lora=c.merge_lora, force=True, progress=None)
    print(f"[tune-launch] {result.summary()}", file=stream, flush=True)
    return out / "consolidated"
