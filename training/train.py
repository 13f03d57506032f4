"""The shared training script, run once per rank: `python -m tune_launch.training.train CONFIG [key.sub=value ...]`.

Parse and validate the YAML, set up rank-tagged logging, build tokenizer/data/model/trainer, train
(resuming from the newest complete checkpoint), save, write output_dir/run_report.json, print the
summary on rank 0, then leave the process group cleanly and exit with a deterministic status.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tune_launch.training.config import ConfigError, check_device, load_config
from tune_launch.training.distributed import RankInfo
from tune_launch.training.heartbeats import start_rank_heartbeat


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune_launch.training.train", description="tune-launch's per-rank training script")
    p.add_argument("config", help="training YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.learning_rate=1e-4")
    return p.parse_args(argv)


def offline_env(cfg, env) -> None:
    """Local data and model: never let datasets/hub touch the network."""
    model_local = cfg.model.from_scratch or Path(str(cfg.model.name_or_path)).exists()
    tok = cfg.tokenizer
    tok_local = tok is not None and (tok.train_vocab_size is not None or Path(str(tok.name_or_path)).exists())
    if cfg.data.all_local and model_local and (tok_local or (tok is None and model_local)):
        if cfg.hub is None:  # hub.strategy checkpoint pushes from the ranks
            env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = RankInfo.from_environ()
    try:
        cfg = load_config(args.config, args.overrides)
        check_device(cfg, info.device, args.config)
    except ConfigError as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    start_rank_heartbeat(cfg.output_dir, info)  # phase and progress for the launcher's stall detection
    offline_env(cfg, os.environ)
    from tune_launch.training.run import run

    return run(cfg, info)


def _exit(code: int) -> None:
    """Flush, then os._exit: avoids rare aborts in library atexit/destructors after the process group is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
