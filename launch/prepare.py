"""`tune-launch prepare train.yaml [key.sub=value ...]`: only the data preparation, a thin adapter over
`training.prepare.prepare_data`.

Trains the tokenizer where the YAML asks for one, tokenizes, packs and writes the cache entry the training run
will map, with a progress bar and a summary. Run it as a CPU job (or the first `sbatch` step) before the GPU
job: the training then finds the entry (a cache hit) and starts in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """examples:
  tune-launch prepare examples/pretrain-1b.yaml
  tune-launch prepare train.yaml data.num_proc=32 data.cache_dir=/shared/cache   (then: tune-launch train.yaml data.cache_dir=...)
the cache goes to data.cache_dir (default: $HF_DATASETS_CACHE/tune-launch); a second run with the same data,
tokenizer and settings finds it and only verifies it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.epilog = EPILOG
    p.add_argument("config", help="training YAML (the same file the training run gets)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override YAML values, e.g. data.num_proc=16")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run_from_args(args: argparse.Namespace) -> int:
    from tune_launch.training.config import load_config
    from tune_launch.training.logs import plan_logging, setup_logging
    from tune_launch.training.distributed import RankInfo

    cfg = load_config(args.config, list(args.overrides))
    from tune_launch.training.train import offline_env

    offline_env(cfg, os.environ)
    setup_logging(plan_logging(RankInfo(), "passive", "warning", True, None))
    if cfg.task == "sft":
        from accelerate import PartialState

        PartialState(cpu=True)  # TRL logs through accelerate, which needs a state; one process, no group
    from tune_launch.training.prepare import prepare_data

    prepared = prepare_data(cfg, os.environ, bar=False if (args.quiet or args.json) else None)
    if args.json:
        print(json.dumps({"entry": str(prepared.entry), "key": prepared.key, "hit": prepared.hit,
                          "seconds": prepared.seconds, "info": prepared.info}, indent=1, sort_keys=True))
    else:
        print(prepared.summary(), flush=True)
        print(f"  {prepared.seconds:.1f} s; train with: tune-launch {args.config} "
              f"{' '.join(args.overrides)}".rstrip(), file=sys.stdout, flush=True)
    return 0
