"""Shared builders for launcher tests: fake hardware, YAMLs for the model shapes in examples/models."""

from __future__ import annotations

from pathlib import Path

import yaml

from tune_launch.launch.hardware import Hardware, hardware_from_dict

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"125m": "llama-125m", "1.1b": "tinyllama-1.1b", "7b": "llama-2-7b", "70b": "llama-2-70b"}
HARDWARE = {
    "cpu": dict(nodes=1, gpus_per_node=0, cpu_cores=2, cpu_ram_gib=24),
    "1x24": dict(nodes=1, gpus_per_node=1, gpu_name="NVIDIA GeForce RTX 4090", gpu_memory_gib=24, bf16=True, cpu_ram_gib=64),
    "1x80": dict(nodes=1, gpus_per_node=1, gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=80, bf16=True, cpu_ram_gib=256),
    "4x16": dict(nodes=1, gpus_per_node=4, gpu_name="Tesla V100-SXM2-16GB", gpu_memory_gib=16, bf16=False, cpu_ram_gib=128),
    "8x80": dict(nodes=1, gpus_per_node=8, gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=80, bf16=True, cpu_ram_gib=1024, cpu_cores=96),
    "2x8x80": dict(nodes=2, gpus_per_node=8, gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gib=80, bf16=True, cpu_ram_gib=1024, cpu_cores=96),
}


def hardware(name: str) -> Hardware:
    return hardware_from_dict(HARDWARE[name])


def training_yaml(tmp: Path, model: str, mode: str = "full", **train) -> Path:
    """A valid training YAML for a model shape in examples/models; mode is full | lora | qlora."""
    data_file = tmp / "data.jsonl"
    data_file.write_text('{"text": "hello"}\n')
    m: dict = {"config_path": str(ROOT / "examples" / "models" / model / "config.json")}
    if mode in ("lora", "qlora"):
        m["lora"] = {"r": 16}
    if mode == "qlora":
        m["quantization"] = {}
    cfg = {"model": m, "tokenizer": {"name_or_path": "gpt2"}, "data": {"train": {"path": str(data_file)}},
           "max_length": 2048, "train": {"micro_batch_size": 1, **train}, "output_dir": str(tmp / "out")}
    path = tmp / f"{model}-{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
