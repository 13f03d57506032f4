"""The model and tokenizer: from the hub/a folder, or built from a config for training from scratch;
4-bit (QLoRA) or 8-bit (LLM.int8) base weights through bitsandbytes and LoRA adapters through peft."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tune_launch.training.schema import ModelConfig, TrainingConfig
from tune_launch.training.settings import DeviceFacts, ResolvedSettings

log = logging.getLogger("tune_launch")


def torch_dtype(settings: ResolvedSettings):
    """The dtype the model is loaded in, as resolved once for the whole job (training/settings.py)."""
    import torch

    return getattr(torch, settings.weights_dtype)


def model_config(m: ModelConfig, vocab_size: int | None):
    """A transformers config for training from scratch (inline dict or config.json), vocab fitted to the tokenizer."""
    from transformers import AutoConfig

    raw: dict[str, Any] = dict(m.config) if m.config is not None else _read_config_json(m.config_path)
    model_type = raw.pop("model_type", "llama")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        raw.pop(key, None)
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **raw)


def _read_config_json(path: str | None) -> dict[str, Any]:
    p = Path(str(path))
    p = p / "config.json" if p.is_dir() else p
    return json.loads(p.read_text())


def quantization_config(cfg: TrainingConfig):
    """bitsandbytes: 4-bit NF4/FP4 for QLoRA, or LLM.int8 (8-bit weights, outlier columns above the threshold in 16 bits)."""
    q = cfg.model.quantization
    if q is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, q.quant_storage))


def build_model(cfg: TrainingConfig, tokenizer, settings: ResolvedSettings, device: DeviceFacts):
    """The causal LM in the resolved weights dtype; seeded so every rank starts from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from tune_launch.training.perf import model_load_kwargs

    m = cfg.model
    dtype = torch_dtype(settings)
    kwargs: dict[str, Any] = model_load_kwargs(cfg, device)  # attention for packed rows
    if m.from_scratch:
        if m.quantization is not None:  # the schema allows it: `tune-launch plan` sizes QLoRA from a config.json
            from tune_launch.training.config import ConfigError

            raise ConfigError("model.quantization: quantizes pretrained weights, and a model trained from scratch "
                              "(model.config / model.config_path) has none; use model.name_or_path or drop model.quantization")
        config = model_config(m, len(tokenizer))
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        qc = quantization_config(cfg)
        if qc is not None:
            kwargs["quantization_config"] = qc
            if m.quantization.bits == 8:  # otherwise one warning per 8-bit matmul call unless activations are fp16
                logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
                log.info("LLM.int8: activations are cast to float16 inside the 8-bit matmuls (bitsandbytes)")
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype, trust_remote_code=m.trust_remote_code,
                                                     **kwargs)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    # no KV cache while training: with one, transformers ignores packed position_ids and attends across documents
    model.config.use_cache = False
    return model


def lora_config(cfg: TrainingConfig):
    lc = cfg.model.lora
    if lc is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias="none", task_type="CAUSAL_LM")


def prepare_for_kbit(model, cfg: TrainingConfig, settings: ResolvedSettings):
    """4- or 8-bit base weights: cast norms to fp32 and enable input grads (peft's recipe, which replaced the
    tutorials' prepare_model_for_int8_training) before adapters go on."""
    if cfg.model.quantization is None:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)


def load_tokenizer(cfg: TrainingConfig, trained_dir: Path | None = None):
    """The YAML's tokenizer (tokenizer.name_or_path, else the model's), or the one trained for this data
    (`trained_dir`, made by the data preparation: training/prepare.py)."""
    from transformers import AutoTokenizer

    t = cfg.tokenizer
    if trained_dir is not None:
        return AutoTokenizer.from_pretrained(str(trained_dir))
    name = t.name_or_path if t is not None and t.name_or_path is not None else cfg.model.name_or_path
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    if t is not None and t.chat_template:
        tok.chat_template = t.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model) -> tuple[int, int]:
    """(numel held by this rank, numel of the full model): sharded DTensors / ZeRO-3 partitions count locally."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3
            full += int(p.ds_numel)
            local += int(p.ds_tensor.numel())
        elif hasattr(p, "to_local"):  # FSDP2 DTensor
            full += p.numel()
            local += p.to_local().numel()
        else:
            full += p.numel()
            local += p.numel()
    return local, full


def trainable_parameters(model) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
