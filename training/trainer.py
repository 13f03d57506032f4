"""TrainingArguments from the typed config, and the Trainer (pre-training) or TRL SFTTrainer (SFT)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from tune_launch.training.best import best_model_arguments
from tune_launch.training.checkpoint import AtomicCheckpointMixin
from tune_launch.training.progress import MetricsCallback  # step lines, metrics.jsonl, the losses for the report
from tune_launch.training.reshard import ReshardRngMixin
from tune_launch.training.streaming import StreamingTrainerMixin, preview_rows
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.settings import DeviceFacts, ResolvedSettings
from tune_launch.training.distributed import RankInfo

log = logging.getLogger("tune_launch")


def arguments(cfg: TrainingConfig, info: RankInfo, sft: bool, settings: ResolvedSettings,
              device: DeviceFacts | None = None) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments and SFTConfig, with every `auto` as resolved. Pure."""
    t, o, lg, ck, ev = cfg.train, cfg.optim, cfg.logging, cfg.checkpoint, cfg.eval
    has_eval = cfg.has_eval
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=ev.per_device_batch_size or settings.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        learning_rate=o.learning_rate, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        max_grad_norm=o.max_grad_norm, lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_steps if o.warmup_steps else o.warmup_ratio,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False, **(t.gradient_checkpointing_kwargs or {})}
        if settings.gradient_checkpointing else None,
        torch_compile=settings.torch_compile,
        use_liger_kernel=settings.use_liger_kernel,
        neftune_noise_alpha=t.neftune_noise_alpha,
        dataloader_num_workers=t.dataloader_num_workers, ddp_timeout=t.ddp_timeout,
        log_level=lg.log_level, log_level_replica=lg.log_level_replica, log_on_each_node=lg.log_on_each_node,
        logging_steps=lg.logging_steps, logging_first_step=True, report_to=[r for r in lg.report_to if r != "none"] or "none",
        run_name=lg.run_name, disable_tqdm=True,  # our own step lines / bar (training/progress.py)
        eval_strategy=ev.eval_strategy if has_eval else "no",
        eval_steps=ev.eval_steps or ck.save_steps, eval_on_start=ev.eval_at_start and has_eval,
        save_strategy=ck.save_strategy, save_steps=ck.save_steps, save_total_limit=ck.save_total_limit,
        **best_model_arguments(cfg),
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=info.device == "cpu",
        include_num_input_tokens_seen="non_padding", remove_unused_columns=sft,
        ignore_data_skip=cfg.data.streaming,  # a stream restores its own position (training/streaming.py)
        ddp_find_unused_parameters=False if info.distributed else None,
        bf16=settings.precision == "bf16", fp16=settings.precision == "fp16", optim=settings.optimizer,
    )
    if info.device == "cuda":  # the GPU fast path: Liger's kernel choice, TF32 (training/perf.py)
        from tune_launch.training.perf import gpu_training_kwargs

        kwargs.update(gpu_training_kwargs(cfg, device or DeviceFacts.probe("cuda"), info.profile, settings))
    if sft:
        kwargs.update(max_length=cfg.max_length, packing=cfg.packing, completion_only_loss=cfg.completion_only_loss,
                      dataset_text_field="text", dataset_num_proc=cfg.data.num_proc,
                      dataset_kwargs={"skip_prepare_dataset": True})  # TRL's preparation ran once, cached (prepare_sft.py)
    kwargs.update(cfg.trainer)  # `trainer:` passthrough, checked against the dataclass before launch (passthrough.py)
    return kwargs


class WhatRanCallback(TrainerCallback):
    """Records, after the first optimizer step (parameters resharded), how many parameters this rank holds."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.facts or model is None:
            return
        from tune_launch.training.model import count_parameters, trainable_parameters

        local, full = count_parameters(model)
        self.facts = {"local_params": local, "total_params": full, "trainable_params": trainable_parameters(model),
                      "param_types": sorted({type(p).__name__ for p in model.parameters()})}


class PretrainTrainer(ReshardRngMixin, AtomicCheckpointMixin, StreamingTrainerMixin, Trainer):
    pass


def build_trainer(cfg: TrainingConfig, info: RankInfo, args, model, tokenizer, train_ds, eval_ds, metrics: MetricsCallback,
                  settings: ResolvedSettings, device: DeviceFacts):
    """Trainer for pre-training, TRL's SFTTrainer for SFT; both with atomic checkpoints."""
    from tune_launch.training.callbacks import settings_callbacks

    callbacks: list[TrainerCallback] = [metrics, *settings_callbacks(cfg)]
    if cfg.task == "sft":
        from trl import SFTTrainer

        from tune_launch.training.model import lora_config, prepare_for_kbit

        cls = type("AtomicSFTTrainer", (ReshardRngMixin, AtomicCheckpointMixin, SFTTrainer), {})
        model = prepare_for_kbit(model, cfg, settings)
        trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=callbacks)
    else:
        from tune_launch.training.data import collator_for
        from tune_launch.training.model import lora_config
        from tune_launch.training.perf import wrap_collator

        lc = lora_config(cfg)
        if lc is not None:
            from peft import get_peft_model

            from tune_launch.training.model import prepare_for_kbit

            model = get_peft_model(prepare_for_kbit(model, cfg, settings), lc)
        trainer = PretrainTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                  processing_class=tokenizer, data_collator=wrap_collator(collator_for(cfg, tokenizer), cfg, device),
                                  callbacks=callbacks)
    trainer.pop_callback(PrinterCallback)  # MetricsCallback prints the step lines (or the terminal's bar) on the main process
    trainer.pop_callback(ProgressCallback)
    # tune-launch reliability (training/signals.py, training/faults.py): SIGTERM/SIGUSR1 -> checkpoint + clean exit;
    # an exception in train() ends the rank at once, named; TUNE_LAUNCH_FAULT arms a test-only fault (inert when unset).
    from tune_launch.training.faults import install_faults
    from tune_launch.training.heartbeat_callback import install_heartbeat
    from tune_launch.training.signals import install_fail_fast, install_graceful_stop

    install_heartbeat(trainer)  # steps, eval and saves to this rank's heartbeat (the launcher's stall detection)
    install_graceful_stop(trainer, info.rank)
    install_fail_fast(trainer, info.rank)
    install_faults(trainer, info.rank)
    return trainer


def first_batch_check(trainer) -> None:
    """Build one training batch the way the Trainer will and make sure it can give a loss."""
    from tune_launch.training.data import check_batch

    batch = trainer.data_collator(preview_rows(trainer.train_dataset, 2))
    check_batch(batch)


def final_save(trainer, cfg: TrainingConfig) -> Path | None:
    """Write the final model (adapters merged when asked) to output_dir/final; FSDP gathers a full state dict."""
    out = Path(cfg.output_dir) / "final"
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    merge = cfg.model.lora is not None and (cfg.model.lora.merge_at_end or cfg.consolidate.merge_lora)
    if merge and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.args.should_save:
            merged.save_pretrained(str(out))
    else:
        if merge:
            log.warning("model.lora.merge_at_end: merging under FSDP/DeepSpeed is not done in-run; saving adapters "
                        "(merge them with peft's merge_and_unload after `tune-launch consolidate`)")
        trainer.save_model(str(out))
    if trainer.args.should_save and trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    return out
