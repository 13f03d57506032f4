"""Streaming consolidation of sharded checkpoints (FSDP DCP, DeepSpeed ZeRO) into Hugging Face safetensors.

Modules, one job each: torchzip (index torch.save files without running them), dcp / zero (readers that
plan each tensor as byte ranges), source (assemble one tensor), plan (output names, dtypes, LoRA, ties,
shards), writer (streamed safetensors + SHA-256), verify, hf_files (config, tokenizer, adapter config),
progress, core (consolidate_checkpoint).
"""

from tune_launch.launch.consolidation.core import ConsolidateResult, consolidate_checkpoint, read_source
from tune_launch.launch.consolidation.source import ConsolidateError

__all__ = ["ConsolidateError", "ConsolidateResult", "consolidate_checkpoint", "read_source"]
