"""consolidate_checkpoint: sharded FSDP/ZeRO checkpoint -> Hugging Face safetensors folder, streamed.

Plan everything from metadata (source pieces, output names, shards), then stream tensor by tensor into
a temporary folder next to the output, verify if asked, and rename it into place only on success.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

from tune_launch.launch.consolidation import hf_files as H
from tune_launch.launch.consolidation.arrays import convert, convert_into
from tune_launch.launch.consolidation.dcp import find_dcp_dir, read_dcp
from tune_launch.launch.consolidation.hf_source import read_hf_folder
from tune_launch.launch.consolidation.plan import (PEFT_PREFIX, OutputPlan, OutputTensor, Shard, lora_modules, output_dtype, parse_size,
                                       plan_adapter, plan_model, plan_shards)
from tune_launch.launch.consolidation.progress import Progress, human_bytes, human_seconds
from tune_launch.launch.consolidation.source import ConsolidateError, FileCache, Source, assemble, check_bounds
from tune_launch.launch.consolidation.writer import write_shards
from tune_launch.launch.consolidation.zero import find_zero_dir, read_zero
from tune_launch.durable import fsync_dir

INDEX = "model.safetensors.index.json"
REPORT = "consolidation.json"


@dataclass
class ConsolidateResult:
    source: str
    output: str
    format: str
    kind: str  # model | adapter
    dtype: str
    ranks: int
    tensors: int
    bytes: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    tied: dict[str, str] = field(default_factory=dict)
    merged_lora: int = 0
    verified: bool = False

    def summary(self) -> str:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        extra = (f", {self.merged_lora} LoRA merges" if self.merged_lora else "") + (", verified" if self.verified else "")
        return (f"consolidated {self.format} ({self.ranks} ranks) -> {self.output}: {self.tensors} tensors, "
                f"{human_bytes(self.bytes)} {self.dtype} in {len(self.files)} file(s), {human_seconds(self.seconds)} "
                f"({human_bytes(rate)}/s){extra}")

    def to_json(self) -> dict:
        return asdict(self)


def read_source(path: Path) -> Source:
    """Detect the format and plan the checkpoint's tensors; nothing is read beyond headers."""
    if not path.exists():
        raise ConsolidateError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise ConsolidateError(f"{path}: expected a checkpoint folder, got a file")
    dcp = find_dcp_dir(path)
    if dcp is not None:
        return read_dcp(dcp)
    zero = find_zero_dir(path)
    if zero is not None:
        return read_zero(zero)
    hint = " (it already holds model.safetensors: nothing to consolidate)" if (path / "model.safetensors").exists() else ""
    raise ConsolidateError(f"{path}: unknown checkpoint format{hint}; expected an FSDP sharded checkpoint "
                           "(pytorch_model_fsdp_0/.metadata) or a DeepSpeed ZeRO one (global_stepN/*_optim_states.pt)")


@dataclass(frozen=True)
class PlannedOutput:
    """What consolidation will write, and from what."""

    plan: OutputPlan
    config: dict  # the model's config, or the adapter's for an adapter folder
    dirs: list[Path]  # folders the side files (config, tokenizer) are copied from
    dtype: str  # the output dtype
    source: Source  # the checkpoint's tensors, with the base weights added for a LoRA merge


def plan_output(source: Source, checkpoint: Path, *, dtype: str, max_shard_size: str | int, merge_lora: bool,
                config_dir: Path | None) -> PlannedOutput:
    dirs = H.candidate_dirs(checkpoint, config_dir)
    loras = lora_modules(source)
    adapter: dict = {}
    if loras:
        adapter, _ = H.adapter_config(dirs)
        dirs = dirs + H.base_model_dirs(adapter)
    elif merge_lora:
        raise ConsolidateError("--merge-lora: the checkpoint holds no LoRA adapters; drop the option")
    if loras and not merge_lora:
        base_cfg = H.find_file(dirs, "config.json")
        cfg_dtype = H.config_dtype(json.loads(base_cfg.read_text())) if base_cfg else None
        out_dtype = output_dtype(dtype, cfg_dtype)
        tensors = plan_adapter(source, out_dtype)
        return PlannedOutput(OutputPlan("adapter", [Shard("adapter_model.safetensors", tuple(tensors))]), adapter, dirs,
                             out_dtype, source)
    if loras:
        source = with_base_weights(source, loras, dirs)
    config, config_path = H.model_config(dirs)
    out_dtype = output_dtype(dtype, H.config_dtype(config))
    model_ties, expected = H.tied_keys(config_path)
    scale = H.lora_scaler(adapter) if loras else None
    tensors, dropped = plan_model(source, out_dtype, {**source.ties, **model_ties}, scale, bool(adapter.get("fan_in_fan_out")))
    if expected is not None:
        missing = sorted(expected - {t.name for t in tensors} - set(model_ties) - set(source.ties))
        if missing:
            raise ConsolidateError(f"the checkpoint lacks {len(missing)} weight(s) the model config expects (e.g. "
                                   f"{missing[0]}); is {config_path} this model's config? pass --config DIR")
    plan = OutputPlan("model", plan_shards(tensors, parse_size(max_shard_size)), dropped)
    return PlannedOutput(plan, config, dirs, out_dtype, source)


def with_base_weights(source: Source, loras: dict, dirs: list[Path]) -> Source:
    """Adapter-only checkpoints (what Trainer saves for PEFT models) take their base weights from the base model."""
    norm = {_normal(t.name): t for t in source.tensors}
    if all(f"{m}.weight" in norm for m in loras):
        return source
    folder = next((d for d in dirs if (d / "model.safetensors").is_file() or (d / INDEX).is_file()), None)
    if folder is None:
        raise ConsolidateError("--merge-lora: the checkpoint holds only the adapters and no base model weights were "
                               "found (adapter_config.json's base_model_name_or_path); pass --config BASE_MODEL_DIR")
    base = read_hf_folder(folder)
    tensors = [norm.pop(t.name, t) for t in base.tensors] + list(norm.values())
    return replace(source, format=f"{source.format}+base", tensors=tensors, files=source.files + base.files,
                   details={**source.details, "base_model": str(folder)})


def _normal(name: str) -> str:
    return (name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name).replace(".base_layer.", ".")


def _producer(source: Source, files: FileCache):
    """produce(t, out) -> tensor t as a numpy array (bf16 as uint16 bits), filled into `out` when given."""
    by_name = source.by_name()

    def produce(t: OutputTensor, out=None):
        if t.lora is None:
            return assemble(by_name[t.source], files, t.dtype, out)
        import torch  # only LoRA merges need a matmul; it is done in fp32 as peft's get_delta_weight does

        base = torch.from_numpy(assemble(by_name[t.source], files, "float32"))
        a = torch.from_numpy(assemble(by_name[t.lora[0]], files, "float32"))
        b = torch.from_numpy(assemble(by_name[t.lora[1]], files, "float32"))
        delta = (b @ a) * t.lora[2]
        base += delta.T if t.transpose_delta else delta
        merged = base.numpy()
        if out is None:
            return convert(merged, "float32", t.dtype)
        target = out.reshape(merged.shape)
        convert_into(target, t.dtype, merged, "float32")
        return target

    return produce


def _prepare_destination(dst: Path, src: Path, force: bool) -> Path:
    dst = dst.resolve()
    if dst == src.resolve() or src.resolve() in dst.parents:
        raise ConsolidateError(f"{dst}: the output must not be inside the checkpoint {src}; choose another folder")
    if dst.exists() and not force:
        raise ConsolidateError(f"{dst} already exists; pass --force to replace it, or choose another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def consolidate_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "auto",
                           max_shard_size: str | int = "5GB", merge_lora: bool = False, verify: bool = False,
                           force: bool = False, config_dir: str | os.PathLike | None = None,
                           progress: TextIO | None = sys.stderr) -> ConsolidateResult:
    """Consolidate checkpoint `src` into the Hugging Face folder `dst` (see docs/consolidate.md)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    source = read_source(src)
    check_bounds(source.tensors)
    out = plan_output(source, src, dtype=dtype, max_shard_size=max_shard_size, merge_lora=merge_lora,
                      config_dir=Path(config_dir) if config_dir else None)
    try:
        return _consolidate(src, dst, out, t0, verify=verify, force=force, progress=progress)
    except OSError as e:  # disk full, file too large, permissions, I/O error: name the file, keep what was there
        where = e.filename or dst
        raise ConsolidateError(f"consolidating into {dst} failed at {where}: {e.strerror or e}; nothing was replaced "
                               "(free space or choose another folder, then run again)") from None


def _consolidate(src: Path, dst: Path, out: PlannedOutput, t0: float, *, verify: bool, force: bool,
                 progress: TextIO | None) -> ConsolidateResult:
    plan, config, dirs, out_dtype, source = out.plan, out.config, out.dirs, out.dtype, out.source
    tmp = _prepare_destination(dst, src, force)
    files = FileCache()
    try:
        produce = _producer(source, files)
        bar = Progress(len(plan.tensors), plan.nbytes, progress)
        hashes = write_shards(plan.shards, tmp, produce, on_tensor=lambda t: bar.advance(t.nbytes))
        bar.done()
        _write_side_files(plan, tmp, config, dirs, out_dtype, hashes, source)
        if verify:
            check = Progress(len(plan.tensors), plan.nbytes, progress, label="verify")
            from tune_launch.launch.consolidation.verify import verify_output

            verify_output(tmp, plan.shards, hashes, produce, on_tensor=lambda t: check.advance(t.nbytes))
            check.done()
        result = ConsolidateResult(
            source=str(source.path), output=str(dst.resolve()), format=source.format, kind=plan.kind, dtype=out_dtype,
            ranks=int(source.details.get("ranks") or 0), tensors=len(plan.tensors), bytes=plan.nbytes,
            seconds=time.perf_counter() - t0, files=hashes, tied=plan.dropped_ties,
            merged_lora=sum(1 for t in plan.tensors if t.lora), verified=verify)
        (tmp / REPORT).write_text(json.dumps(result.to_json(), indent=1, sort_keys=True) + "\n")
        fsync_dir(tmp)
        _swap_into_place(tmp, dst.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        files.close()
    result.seconds = time.perf_counter() - t0
    return result


def _write_side_files(plan: OutputPlan, tmp: Path, config: dict, dirs: list[Path], out_dtype: str,
                      hashes: dict[str, str], source: Source) -> None:
    if plan.kind == "adapter":
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.nbytes, "format": "pt", "sha256": hashes,
                              "tune_launch": {"source_format": source.format, "dtype": out_dtype,
                                              "tied": plan.dropped_ties}},
                 "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        H.write_config(config, out_dtype, tmp)
        H.copy_side_files(dirs, tmp, ("generation_config.json",))
    H.copy_side_files(dirs, tmp, H.TOKENIZER_FILES)
    for p in tmp.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder into place; an existing output (--force) is moved aside first, then removed."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # put the previous output back: never leave the user with neither
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
