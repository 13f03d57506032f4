"""One rank's run, start to finish: the steps `train.py` calls after the config is valid."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tune_launch import heartbeat
from tune_launch.errors import TuneLaunchError
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.distributed import RankInfo, teardown
from tune_launch.training.heartbeats import phase, report_crash
from tune_launch.training.logs import close_logging, plan_logging, reattach_library_loggers, setup_logging

log = logging.getLogger("tune_launch")


def run(cfg: TrainingConfig, info: RankInfo) -> int:
    out = Path(cfg.output_dir)
    lg = cfg.logging
    logger = setup_logging(plan_logging(info, lg.log_level, lg.log_level_replica, lg.log_on_each_node, str(out),
                                        lg.progress, sys.stdout.isatty()))
    t_start = time.perf_counter()
    finished = False
    try:
        code = _run(cfg, info, out, logger, t_start)
        finished = True
        heartbeat.finish("done")
        return code
    except TuneLaunchError as e:  # bad config or checkpoint: one line, and the line the supervisor reports
        log.error("%s", e)
        report_crash(info.rank, e, refused=True)
        return 2
    except Exception as e:  # noqa: BLE001 - a crash on one rank: name it, and do not wait for peers that may be stuck
        report_crash(info.rank, e)  # one line on the console, the traceback in the node's log file
        return 1
    finally:
        close_logging(logger)
        if finished:
            teardown()  # a barrier after a failure would wait forever for a peer stuck in a collective


def _run(cfg: TrainingConfig, info: RankInfo, out: Path, logger: logging.Logger, t_start: float) -> int:
    from transformers import set_seed

    from tune_launch.training.checkpoint import check_resume_compatible, resolve_resume, run_fingerprint
    from tune_launch.profiles import get_profile
    from tune_launch.training.reshard import plan_resume, with_batch
    from tune_launch.training.model import build_model
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import MetricsCallback, WhatRanCallback, arguments, build_trainer, first_batch_check

    if info.device == "cpu":
        from tune_launch.training.cpu_rehearsal import prepare_cpu_run

        prepare_cpu_run(out / ".tune_launch", info.rank)
    sft = cfg.task == "sft"
    if sft:
        from trl import SFTConfig as Args
    else:
        from transformers import TrainingArguments as Args
    device = DeviceFacts.probe(info.device)
    profile = get_profile(info.profile)
    settings = resolve_settings(cfg, device, profile)
    resume = resolve_resume(cfg.checkpoint.resume, out)
    start = plan_resume(cfg, info.world_size, resume, profile.layout_family, settings.micro_batch_size)
    cfg = with_batch(cfg, start.batch)  # the accumulation that keeps the global batch on this world size
    args = Args(**arguments(cfg, info, sft, settings, device))
    _ = args.device  # initializes the process group (gloo on CPU, nccl on GPU)
    reattach_library_loggers(logger)  # accelerate imported DeepSpeed, which installs its own handler
    log.info("rank %d/%d on node %d, profile %s, device %s, task %s", info.rank, info.world_size, info.node_rank,
             info.profile, info.device, cfg.task)
    log.info("settings: micro batch %d, gradient checkpointing %s; %s", settings.micro_batch_size,
             "on" if settings.gradient_checkpointing else "off", "; ".join(settings.reasons))
    set_seed(cfg.seed)

    phase("data")
    tokenizer, train_ds, eval_ds = run_data(cfg, info, out, args if sft else None)
    phase("model_load")
    model = build_model(cfg, tokenizer, settings, device)
    metrics = MetricsCallback(out, info.device, info.world_size)
    what_ran = WhatRanCallback()
    trainer = build_trainer(cfg, info, args, model, tokenizer, train_ds, eval_ds, metrics, settings, device)
    trainer.add_callback(what_ran)
    fingerprint = run_fingerprint(cfg, info, trainer.model, settings.micro_batch_size)  # after peft wrapped it, before FSDP/DeepSpeed
    trainer.tune_launch_fingerprint = fingerprint
    reattach_library_loggers(logger)
    first_batch_check(trainer)

    if resume:
        check_resume_compatible(resume, fingerprint)
    if info.is_main and start.line():
        log.info("%s", start.line())
    resharding = start.prepare(trainer, out, info.rank)  # per-rank RNG, universal conversion for ZeRO
    log.info("resuming from %s", resume) if resume else log.info("starting from step 0 (no complete checkpoint to resume)")
    from tune_launch.training.trackers import install_trackers, resolve_identity

    install_trackers(trainer, resolve_identity(resume), out, _step_of(resume), os.environ)  # same W&B run / TB folder
    if resume:
        phase("model_load", f"resuming from {resume.name}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = _after_training(cfg, trainer, metrics, out, has_eval=eval_ds is not None)
    report = build_report(cfg, info, trainer, metrics, what_ran, result, resume, final, time.perf_counter() - t_start)
    report["batch"] = resharding
    if info.is_main:
        (out / "run_report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
        report["picture"] = _draw_picture(out)
        print(summary(report), flush=True)
    return 0


def _after_training(cfg: TrainingConfig, trainer, metrics, out: Path, has_eval: bool) -> Path | None:
    """The last evaluation (unless the last step had one), the checkpoint the launcher consolidates, and the
    final model; returns where the final model went."""
    from tune_launch.training.trainer import final_save

    if has_eval and (not metrics.eval_losses or metrics.eval_losses[-1][0] != trainer.state.global_step):
        trainer.evaluate()
    if cfg.consolidate.enabled and cfg.consolidate.checkpoint == "last":  # best: that checkpoint exists already
        _checkpoint_last_step(trainer, out)
    return final_save(trainer, cfg) if cfg.checkpoint.save_final_model else None


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def _draw_picture(out: Path) -> str | None:
    """output_dir/report.png from metrics.jsonl; a failure to draw is a warning, never a failed run."""
    try:
        from tune_launch.training.metrics_file import read_run
        from tune_launch.training.report_png import draw_report

        path = out / "report.png"
        draw_report([read_run(out)], path)
        return str(path.resolve())
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        log.warning("report.png not drawn: %s: %s (`tune-launch report %s` retries)", type(e).__name__, e, out)
        return None


def _checkpoint_last_step(trainer, out: Path) -> None:
    """Make the newest complete checkpoint the last step (a collective save on every rank): the launcher
    consolidates it once every rank has exited (consolidate.enabled)."""
    from tune_launch.training.checkpoint import find_resume_checkpoint

    newest = find_resume_checkpoint(out, warn=False)
    if newest is None or newest.name != f"checkpoint-{trainer.state.global_step}":
        trainer._save_checkpoint(trainer.model, trial=None)


def run_data(cfg: TrainingConfig, info: RankInfo, out: Path, sft_args):
    """(tokenizer, train, eval): prepared once per job and cached (training/coordinate.py), opened memory-mapped
    here; with data.streaming the training rows are read and packed on the fly instead."""
    from tune_launch.training.coordinate import prepared_for_run
    from tune_launch.training.model import load_tokenizer

    prepared = prepared_for_run(cfg, info, sft_args=sft_args)
    tokenizer = prepared.tokenizer or load_tokenizer(cfg, prepared.tokenizer_dir)
    if prepared.tokenizer_dir is not None and info.is_main:
        tokenizer.save_pretrained(str(out / "tokenizer"))  # beside the run, as before (consolidation looks there)
    train_ds, eval_ds = prepared.datasets()
    if cfg.data.streaming:
        from tune_launch.training.streaming import PackedStream

        train_ds = PackedStream(cfg, tokenizer, info.rank, info.world_size)
        log.info("data.streaming: rank %d reads %d of the stream's units", info.rank, len(train_ds.units))
    return tokenizer, train_ds, eval_ds


def build_report(cfg, info: RankInfo, trainer, metrics, what_ran, result, resume, final, wall: float) -> dict[str, Any]:
    """Facts about what really ran, gathered from every rank onto rank 0."""
    import torch.distributed as dist

    from tune_launch.training.best import best_facts
    from tune_launch.training.model import trainable_parameters

    eng = trainer.model_wrapped
    ds: dict[str, Any] = {}
    if trainer.is_deepspeed_enabled:
        ds = {"zero_stage": eng.zero_optimization_stage(), "optimizer": type(eng.optimizer).__name__,
              "inner_optimizer": type(getattr(eng.optimizer, "optimizer", None)).__name__,
              "train_batch_size": eng.config.get("train_batch_size") if isinstance(eng.config, dict) else None,
              "offload_optimizer": bool(eng.zero_offload_optimizer()) if hasattr(eng, "zero_offload_optimizer") else None}
    mine = {"rank": info.rank, "node": info.node_rank, **what_ran.facts}
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    steps = trainer.state.global_step
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    first_step = int(resume.name.split("-")[-1]) if resume else 0
    return {
        "task": cfg.task, "profile": info.profile, "device": info.device,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "is_fsdp": bool(trainer.is_fsdp_enabled), "is_deepspeed": bool(trainer.is_deepspeed_enabled),
        "wrapper": type(trainer.model_wrapped).__name__, "model_class": type(trainer.model).__name__,
        "deepspeed": ds, "ranks": ranks, "trainable_params": what_ran.facts.get("trainable_params", trainable_parameters(trainer.model)),
        "steps": steps, "resumed_from": str(resume) if resume else None, "resumed_at_step": first_step,
        "train_losses": metrics.train_losses, "eval_losses": metrics.eval_losses,
        "final_train_loss": float(result.training_loss) if result is not None else None,
        "tokens": tokens, "train_seconds": metrics.train_seconds,
        "tokens_per_second": tokens / metrics.train_seconds if metrics.train_seconds else 0.0,
        "wall_seconds": wall, "output_dir": str(Path(cfg.output_dir).resolve()),
        "final_model": str(final.resolve()) if final else None, "checkpoint": _newest_checkpoint(Path(cfg.output_dir)),
        **best_facts(trainer),  # best checkpoint and early stop (training/best.py)
    }


def _newest_checkpoint(out: Path) -> str | None:
    from tune_launch.training.checkpoint import find_resume_checkpoint

    p = find_resume_checkpoint(out, warn=False)
    return str(p.resolve()) if p else None


def summary(r: dict[str, Any]) -> str:
    """The few lines a user reads at the end of a run."""
    from tune_launch.training.best import best_summary

    tl, el = r["train_losses"], r["eval_losses"]
    loss = f"{tl[0][1]:.3f} -> {tl[-1][1]:.3f}" if tl else "n/a"
    ev = f"{el[0][1]:.3f} -> {el[-1][1]:.3f}" if el else "n/a"
    resumed = f" (resumed at step {r['resumed_at_step']})" if r["resumed_from"] else ""
    return "\n".join([
        f"done: {r['steps']} steps{resumed} on {r['world_size']} process(es) [{r['profile']}, {r['distributed_type']}], "
        f"{r['tokens_per_second']:.0f} tokens/s, {r['wall_seconds']:.0f} s",
        f"  train loss {loss}; eval loss {ev}",
        f"  checkpoint: {r['checkpoint'] or 'none'}",
        *best_summary(r),
        f"  final model: {r['final_model'] or 'not saved'}",
        *([f"  report: {r['picture']} (every metric: {Path(r['output_dir']) / 'metrics.jsonl'})"] if r.get("picture") else []),
    ])
