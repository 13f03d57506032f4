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


def consolidate_finished_run(cfg, started_at: float, stream: TextIO = sys.stderr) -> Path | None:
    """consolidate.enabled: after every rank has exited cleanly, stream the run's newest checkpoint into HF
    safetensors at output_dir/consolidated (on the launcher, so no rank waits in a barrier meanwhile).

    Only a run that finished does so: rank 0 writes run_report.json at the very end, which a run stopped by a
    signal (checkpoint, then exit for a requeue) never reaches."""
    from tune_launch.training.checkpoint import find_resume_checkpoint

    out = Path(cfg.output_dir)
    report = out / "run_report.json"
    if not report.is_file() or report.stat().st_mtime < started_at:
        return None
    checkpoint = find_resume_checkpoint(out, warn=False)
    if checkpoint is None:
        print("[tune-launch] consolidate.enabled: no complete checkpoint to consolidate", file=stream, flush=True)
        return None
    c = cfg.consolidate
    result = consolidate_checkpoint(checkpoint, out / "consolidated", dtype=c.dtype, max_shard_size=c.max_shard_size,
                                    merge_lora=c.merge_lora, force=True, progress=None)
    print(f"[tune-launch] {result.summary()}", file=stream, flush=True)
    return out / "consolidated"
