"""The training YAML's schema: one pydantic model per section, every section forbids unknown keys.

No torch import here, so the launcher validates a YAML in milliseconds before any process starts.
`training/config.py` reads, overrides and validates a YAML into `TrainingConfig`; this module only says
what a valid YAML is. Validators raise ValueError; `config.explain_validation_error` turns that into one line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tune_launch.training.schema_data import DataConfig, DataSource, SyntheticData, TokenizerConfig
from tune_launch.training.schema_section import Section as _Section

__all__ = ["DataConfig", "DataSource", "SyntheticData", "TokenizerConfig", "TrainingConfig"]


class LoraConfig(_Section):
    """LoRA adapters through peft (also the adapter half of QLoRA)."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_at_end: bool = False


FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype", "quant_storage")


class QuantizationConfig(_Section):
    """Frozen base weights through bitsandbytes, under LoRA adapters: 4-bit NF4/FP4 (QLoRA, the default) or
    8-bit LLM.int8 (`load_in_8bit: true`, 1 byte per weight, outlier features kept in 16 bits)."""

    load_in_4bit: bool | None = None  # default: true, unless load_in_8bit
    load_in_8bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["bfloat16", "float16", "float32", "uint8"] = "uint8"
    int8_threshold: float = Field(6.0, ge=0)  # LLM.int8 outlier threshold (bitsandbytes' llm_int8_threshold)

    @model_validator(mode="after")
    def _one_width(self) -> QuantizationConfig:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true; pick one (4-bit: QLoRA, 8-bit: LLM.int8)")
        if self.load_in_4bit is False and not self.load_in_8bit:
            raise ValueError("neither load_in_4bit nor load_in_8bit; drop model.quantization for LoRA on 16-bit weights")
        if self.load_in_8bit:
            four = sorted(set(FOUR_BIT_ONLY) & self.model_fields_set)
            if four:
                raise ValueError(f"{four[0]} is a 4-bit setting; 8-bit LLM.int8 has none (drop it, or use load_in_4bit)")
        elif "int8_threshold" in self.model_fields_set:
            raise ValueError("int8_threshold is an 8-bit setting; add load_in_8bit: true or drop it")
        return self

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4


class ModelConfig(_Section):
    """Which model: a hub name or local path, or an inline config trained from scratch."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    config_path: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [s for s in ("name_or_path", "config", "config_path") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of model.name_or_path (hub name or local folder), model.config (inline "
                f"config, trained from scratch) or model.config_path (config.json, from scratch); got {sources or 'none'}"
            )
        q = self.quantization
        if q is not None and self.lora is None:
            kind = "QLoRA" if q.bits == 4 else "8-bit LoRA"
            raise ValueError(f"model.quantization ({kind}) needs model.lora: {q.bits}-bit weights cannot be trained directly")
        return self

    @property
    def from_scratch(self) -> bool:
        return self.name_or_path is None


class OptimConfig(_Section):
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)


class TrainConfig(_Section):
    """Steps, batch and precision. `micro_batch_size: auto` lets the memory plan choose."""

    micro_batch_size: int | Literal["auto"] = 8
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_steps: int = Field(-1, ge=-1)
    num_epochs: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    neftune_noise_alpha: float | None = Field(None, gt=0)
    torch_compile: bool | Literal["auto"] = "auto"
    use_liger_kernel: bool | Literal["auto"] = "auto"
    dataloader_num_workers: int = Field(0, ge=0)
    ddp_timeout: int = Field(1800, gt=0)  # seconds a collective may wait (e.g. while rank 0 tokenizes)
    global_batch_size: int | None = Field(None, gt=0)  # fixes micro x processes x accumulation: accumulation derived
    gradient_checkpointing_kwargs: dict[str, Any] | None = None  # e.g. {use_reentrant: false} (the default)

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v


class LoggingConfig(_Section):
    """Same meaning as transformers' TrainingArguments fields of these names (`progress` is tune-launch's own)."""

    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] = "passive"
    log_level_replica: Literal["debug", "info", "warning", "error", "critical", "passive"] = "warning"
    log_on_each_node: bool = True
    logging_steps: int = Field(10, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(default_factory=lambda: ["none"])
    run_name: str | None = None
    progress: Literal["auto", "bar", "lines"] = "auto"  # rank 0's console: a bar on a terminal (auto), or step lines

    @field_validator("report_to", mode="before")
    @classmethod
    def _single_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CheckpointConfig(_Section):
    save_strategy: Literal["steps", "epoch"] = "steps"
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(3, gt=0)
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | never | a checkpoint folder
    save_final_model: bool = True

    @field_validator("resume")
    @classmethod
    def _resume_value(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("use 'auto', 'never' or the path of a checkpoint folder")
        return v


class EarlyStoppingConfig(_Section):
    """Stop when eval.metric_for_best_model has not improved by more than `threshold` for `patience` evaluations."""

    patience: int = Field(gt=0)
    threshold: float = Field(0.0, ge=0)


class EvalConfig(_Section):
    """When to evaluate, and which checkpoint is the best (same meaning as transformers' fields of these names)."""

    eval_strategy: Literal["steps", "epoch"] = "steps"
    eval_steps: int | None = Field(None, gt=0)
    eval_at_start: bool = False
    per_device_batch_size: int | None = Field(None, gt=0)
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None  # default: loss, once a best checkpoint is tracked
    greater_is_better: bool | None = None  # default: false for a loss, true for any other metric
    early_stopping: EarlyStoppingConfig | None = None

    @property
    def best_metric(self) -> str | None:
        """The metric that picks the best checkpoint, without transformers' eval_ prefix; None if none is tracked."""
        if self.metric_for_best_model is not None:
            return self.metric_for_best_model.removeprefix("eval_")
        return "loss" if self.load_best_model_at_end or self.early_stopping is not None else None

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.best_metric or "loss").endswith("loss")


class ConsolidateConfig(_Section):
    """Consolidate sharded checkpoints into HF safetensors at the end of training."""

    enabled: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    merge_lora: bool = False
    checkpoint: Literal["best", "last"] = "last"  # best: the checkpoint eval.metric_for_best_model liked most


class HubConfig(_Section):
    """Publish to the Hugging Face Hub: the final (consolidated) model at the end; with `checkpoint` also the newest
    checkpoint (to last-checkpoint/, resumable), with `all_checkpoints` every one. The token comes only from HF_TOKEN
    in the environment."""

    model_id: str
    strategy: Literal["end", "checkpoint", "all_checkpoints"] = "end"
    private: bool = True

    @field_validator("model_id")
    @classmethod
    def _repo_shape(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", v) or ".." in v or len(v) > 96:
            raise ValueError("give the repository as namespace/name (your user or organization, then the model), "
                             "letters, digits, '.', '_' or '-'")
        return v


class WatchdogConfig(_Section):
    """Hang detection by the launcher (launch/stall.py): the job has stalled when no rank has made progress
    for longer than its phase allows. A training step may take max(train_step_s, step_factor x the median
    step) once `timed_steps` steps are timed, `first_steps_s` before; the other phases have their own limits,
    counted from the last progress the phase reported (a data phase that reports progress never stalls).
    On a stall every rank's stack is written to output_dir/logs/ and the launch exits 124; under SLURM
    `on_stall: requeue` requeues the job instead (it resumes from the newest complete checkpoint)."""

    enabled: bool = True
    train_step_s: float = Field(60.0, gt=0)
    step_factor: float = Field(10.0, gt=0)
    timed_steps: int = Field(3, ge=1)
    first_steps_s: float = Field(900.0, gt=0)  # compilation, autotuning, the first collectives
    starting_s: float = Field(600.0, gt=0)  # imports and the process group's rendezvous
    data_s: float = Field(1800.0, gt=0)
    model_load_s: float = Field(3600.0, gt=0)  # a download of the weights, a resume's load
    eval_s: float = Field(900.0, gt=0)  # between two evaluation batches
    save_s: float = Field(1800.0, gt=0)
    consolidate_s: float = Field(3600.0, gt=0)
    on_stall: Literal["fail", "requeue"] = "fail"
    capture_stacks: bool = True


class TrainingConfig(_Section):
    """The whole training YAML."""

    model: ModelConfig
    tokenizer: TokenizerConfig | None = None
    task: Literal["pretrain", "sft"] = "pretrain"
    data: DataConfig
    max_length: int = Field(2048, gt=0)
    packing: bool = True
    completion_only_loss: bool = True
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig)
    hub: HubConfig | None = None
    trainer: dict[str, Any] = Field(default_factory=dict)  # extra TrainingArguments / SFTConfig fields
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    output_dir: str = "outputs/run"
    seed: int = 42

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainingConfig:
        if self.tokenizer is None and self.model.from_scratch:
            raise ValueError("tokenizer: a model trained from scratch needs tokenizer.name_or_path or tokenizer.train_vocab_size")
        if self.task == "pretrain" and self.data.formats - {"text"}:
            raise ValueError("data.train.format: task 'pretrain' reads plain text; use format: text or task: sft")
        if self.task == "sft" and "text" in self.data.formats and self.completion_only_loss:
            raise ValueError("completion_only_loss: plain text has no completion; set it to false or use format alpaca/chat")
        if self.consolidate.merge_lora and self.model.lora is None:
            raise ValueError("consolidate.merge_lora: LoRA options without model.lora; add model.lora or drop the option")
        if self.train.neftune_noise_alpha is not None and self.task != "sft":
            raise ValueError("train.neftune_noise_alpha: NEFTune is for fine-tuning; use task: sft or drop it")
        from tune_launch.training.schema_checks import check_best_model, check_outputs, check_schedules

        check_schedules(self)
        check_best_model(self)
        check_outputs(self)
        self._streaming_checks()
        if self.trainer:
            from tune_launch.training.passthrough import check_trainer_fields

            check_trainer_fields(self.trainer, self.task)
        return self

    def _streaming_checks(self) -> None:
        if not self.data.streaming:
            return
        if self.task != "pretrain":
            raise ValueError("data.streaming: streams task pretrain; SFT data is prepared once and cached (drop data.streaming)")
        if self.train.max_steps <= 0:
            raise ValueError("train.max_steps: a stream has no length, so epochs are unknown; set train.max_steps")
        if self.train.dataloader_num_workers:
            raise ValueError("train.dataloader_num_workers: data.streaming reads and tokenizes in a background thread of "
                             "each rank; set it to 0")

    @property
    def has_eval(self) -> bool:
        """An eval split exists (generated, given, or cut from the training data)."""
        return self.data.generate is not None or bool(self.data.eval) or self.data.eval_fraction > 0
