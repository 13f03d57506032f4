"""DeepSpeed ZeRO-1/2/3 checkpoints (offload or not): fp32 master weights from the optimizer partitions.

Layout knowledge from deepspeed/utils/zero_to_fp32.py, without its whole-model-in-RAM merge:
- ZeRO-1/2: each rank's `single_partition_of_fp32_groups[g]` is one contiguous slice of group g's flat
  vector (ranks concatenated); parameters follow each other in it, with `param_alignment_paddings`.
- ZeRO-3: every parameter is split into ceil(numel/world) elements per rank, laid end to end in each
  rank's `fp32_flat_groups` (groups concatenated).
- Frozen parameters live in the model_states files (`frozen_param_fragments`), buffers in `module`,
  tied parameters in `shared_params` {tied name: kept name}.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tune_launch.launch.consolidation.source import ConsolidateError, Piece, Source, SourceTensor, check_coverage
from tune_launch.launch.consolidation.torchzip import TensorRef, TorchZipError, index_file, read_small

_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")


def find_zero_dir(path: Path) -> Path | None:
    """The global_stepN folder: named by `latest`, the folder itself, or the only global_step* inside."""
    if list(path.glob("*_optim_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (path / tag).is_dir():
            return path / tag
        raise ConsolidateError(f"{latest} names {tag!r}, but {path / tag} does not exist; the save did not finish")
    steps = [p for p in path.glob("global_step*") if p.is_dir()]
    if len(steps) == 1:
        return steps[0]
    if len(steps) > 1:
        raise ConsolidateError(f"{path} holds {len(steps)} global_step folders and no `latest` file; pass one of them")
    return None


def _load(path: Path) -> Any:
    try:
        return index_file(path)
    except TorchZipError as e:
        raise ConsolidateError(f"truncated or damaged shard {path} ({e}); copy it again or use an earlier checkpoint") from None


def _value(x: Any) -> Any:
    """Enum values pickled by DeepSpeed (ZeroStageEnum) come back as stubs holding their value."""
    args = getattr(x, "args", None)
    return args[0] if isinstance(args, tuple) and args else x


def read_zero(zero_dir: Path) -> Source:
    optim = sorted(zero_dir.glob("*_optim_states.pt"))
    ranks: dict[int, Path] = {}
    for f in optim:
        m = _RANK.search(f.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise ConsolidateError(f"{f.name}: tensor/model-parallel ZeRO checkpoints (mp_rank > 0) are not supported")
        ranks[int(m.group(1))] = f
    if not ranks:
        raise ConsolidateError(f"{zero_dir}: no zero_pp_rank_*_optim_states.pt files; not a DeepSpeed ZeRO checkpoint")
    first = _load(ranks[min(ranks)])
    osd = first.get("optimizer_state_dict", {}) if isinstance(first, dict) else {}
    stage = _value(osd.get("zero_stage"))
    world = osd.get("partition_count")
    world = max(world) if isinstance(world, list) else world
    if not isinstance(stage, int) or not isinstance(world, int):
        raise ConsolidateError(f"{ranks[min(ranks)]} is not a ZeRO optimizer state (no zero_stage/partition_count)")
    for r in range(world):
        if r not in ranks:
            raise ConsolidateError(f"missing rank file {zero_dir / f'zero_pp_rank_{r}_mp_rank_00_optim_states.pt'} "
                                   f"(the checkpoint was saved by {world} ranks); copy every rank's file")
    if len(ranks) > world:
        raise ConsolidateError(f"{zero_dir} holds {len(ranks)} optimizer files for a {world}-rank run: files of "
                               "different runs are mixed; use one run's folder")
    optims = [first] + [_load(ranks[r]) for r in range(1, world)]
    if stage == 3:
        models = [_load(_model_file(zero_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")) for r in range(world)]
    else:
        models = [_load(_model_file(zero_dir, "mp_rank_00_model_states.pt"))]
    _check_same_run(zero_dir, ranks, optims, models, stage, world)
    m0 = models[0]
    tensors = _buffers(m0)
    if stage == 3:
        tensors += _zero3_frozen(m0, models, world)
        tensors += _zero3_trainable(m0, [o["optimizer_state_dict"]["fp32_flat_groups"] for o in optims], world, zero_dir)
    else:
        tensors += _zero2_frozen(m0)
        tensors += _zero2_trainable(m0, optims, world, zero_dir)
    for t in tensors:
        check_coverage(t)
    ties = {str(k): str(v) for k, v in (m0.get("shared_params") or {}).items()}
    files = [ranks[r] for r in range(world)] + sorted(zero_dir.glob("*model_states.pt"))
    return Source(f"deepspeed-zero{stage}", zero_dir, tensors, ties=ties, files=files,
                  details={"ranks": world, "stage": stage, "global_step": m0.get("global_steps"),
                           "ds_version": m0.get("ds_version")})


def _model_file(zero_dir: Path, name: str) -> Path:
    p = zero_dir / name
    if not p.is_file():
        raise ConsolidateError(f"missing rank file {p}; copy every rank's model_states file")
    return p


def _check_same_run(zero_dir: Path, ranks: dict[int, Path], optims: list, models: list, stage: int, world: int) -> None:
    for r, o in enumerate(optims):
        osd = o.get("optimizer_state_dict", {}) if isinstance(o, dict) else {}
        pc = osd.get("partition_count")
        if _value(osd.get("zero_stage")) != stage or (max(pc) if isinstance(pc, list) else pc) != world:
            raise ConsolidateError(f"{ranks[r].name} was saved by a different run (ZeRO stage/world size differ from "
                                   f"{ranks[0].name}); use one run's folder")
    steps = {m.get("global_steps") for m in models}
    shapes = {repr(m.get("param_shapes")) for m in models}
    if len(steps) > 1 or len(shapes) > 1:
        raise ConsolidateError(f"{zero_dir}: the model_states files come from different saves (global steps "
                               f"{sorted(map(str, steps))}); use one checkpoint's files")
    adam_steps = [_optimizer_step(o) for o in optims]
    if len({x for x in adam_steps if x is not None}) > 1:
        raise ConsolidateError(f"{zero_dir}: the optimizer files come from different steps ("
                               + ", ".join(f"{ranks[r].name}: step {x}" for r, x in enumerate(adam_steps))
                               + "); the files of different saves are mixed, use one checkpoint's files")
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    sizes = [[g.numel for g in o["optimizer_state_dict"][key]] for o in optims]
    if any(s != sizes[0] for s in sizes):
        raise ConsolidateError(f"{zero_dir}: optimizer partitions differ in size between ranks ({sizes}); "
                               "the rank files come from different runs")


def _shape(s: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in s)


def _buffers(m0: dict) -> list[SourceTensor]:
    module = m0.get("module") or {}
    out = []
    for name in m0.get("buffer_names") or []:
        ref = module.get(name)
        if isinstance(ref, TensorRef):
            out.append(SourceTensor(name, ref.shape, ref.dtype, (Piece(ref, 0, ref.numel),)))
    return out


def _zero2_frozen(m0: dict) -> list[SourceTensor]:
    frags = m0.get("frozen_param_fragments") or {}
    out = []
    for name, shape in (m0.get("frozen_param_shapes") or {}).items():
        ref = frags[name]
        out.append(SourceTensor(name, _shape(shape), ref.dtype, (Piece(ref, 0, math.prod(_shape(shape))),)))
    return out


def _zero3_frozen(m0: dict, models: list, world: int) -> list[SourceTensor]:
    out = []
    for name, shape in (m0.get("frozen_param_shapes") or {}).items():
        shape = _shape(shape)
        n, part = math.prod(shape), math.ceil(math.prod(shape) / world)
        pieces = []
        for r, m in enumerate(models):
            ref = m["frozen_param_fragments"][name]
            count = max(0, min(part, n - r * part))
            if count:
                pieces.append(Piece(ref, 0, count, dest=r * part))
        out.append(SourceTensor(name, shape, pieces[0].ref.dtype if pieces else "float32", tuple(pieces)))
    return out


def _span(groups: list[TensorRef], start: int, count: int) -> list[tuple[TensorRef, int, int]]:
    """(group, start in group, count) covering [start, start+count) of the groups laid end to end."""
    out, base = [], 0
    for g in groups:
        lo, hi = max(start, base), min(start + count, base + g.numel)
        if lo < hi:
            out.append((g, lo - base, hi - lo))
        base += g.numel
    return out


def _zero3_trainable(m0: dict, flat: list[list[TensorRef]], world: int, zero_dir: Path) -> list[SourceTensor]:
    shapes = {k: _shape(v) for d in m0["param_shapes"] for k, v in d.items()}
    out, offset = [], 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / world)
        pieces = []
        for r in range(world):
            want = max(0, min(part, n - r * part))
            dest = r * part
            for g, s, c in _span(flat[r], offset, want):
                pieces.append(Piece(g, s, c, dest=dest))
                dest += c
        out.append(SourceTensor(name, shape, flat[0][0].dtype, tuple(pieces)))
        offset += part
    avail = sum(g.numel for g in flat[0])
    if offset != avail:
        raise ConsolidateError(f"{zero_dir}: parameters need {offset} elements per rank, the partitions hold {avail}; "
                               "model and optimizer files do not match")
    return out


def _zero2_trainable(m0: dict, optims: list, world: int, zero_dir: Path) -> list[SourceTensor]:
    groups = [o["optimizer_state_dict"]["single_partition_of_fp32_groups"] for o in optims]
    paddings = optims[0]["optimizer_state_dict"].get("param_alignment_paddings")
    out = []
    for gi, shapes in enumerate(m0["param_shapes"]):
        parts = [groups[r][gi] for r in range(world)]  # rank r holds [r*P, (r+1)*P) of the group's flat vector
        offset = 0
        for pi, (name, shape) in enumerate(shapes.items()):
            shape = _shape(shape)
            n = math.prod(shape)
            pieces = []
            for g, s, c in _span(parts, offset, n):
                pieces.append(Piece(g, s, c, dest=sum(p.count for p in pieces)))
            out.append(SourceTensor(name, shape, parts[0].dtype, tuple(pieces)))
            offset += n
            if paddings is not None:
                offset += int(paddings[gi][pi])
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(sum(p.numel for p in parts) / align):
            raise ConsolidateError(f"{zero_dir}: group {gi} needs {offset} elements, the partitions hold "
                                   f"{sum(p.numel for p in parts)}; model and optimizer files do not match")
    return out


def _optimizer_step(optim: dict) -> float | None:
    """The optimizer's step count saved by this rank (Adam's `step`), read from its 4-8 bytes; None if absent."""
    osd = optim.get("optimizer_state_dict") or {}
    state = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}
    per_param = state.get("state") if isinstance(state, dict) else None
    if isinstance(state, list):  # ZeRO-3 keeps one optimizer state per sub-group
        per_param = (state[0] or {}).get("state") if state and isinstance(state[0], dict) else None
    if not isinstance(per_param, dict) or not per_param:
        return None
    step = next(iter(per_param.values())).get("step") if isinstance(next(iter(per_param.values())), dict) else None
    if isinstance(step, (int, float)):
        return float(step)
    if isinstance(step, TensorRef) and step.numel == 1:
        from tune_launch.launch.consolidation.arrays import to_float32

        try:
            value = read_small(step)
            return float((to_float32(value, "bfloat16") if step.dtype == "bfloat16" else value)[0])
        except TorchZipError as e:
            raise ConsolidateError(f"truncated or damaged shard {step.path} ({e}); copy it again") from None
    return None
