"""`python -m tune_launch.training.zero_universal INPUT OUTPUT`: DeepSpeed's ds_to_universal, corrected and checked.

The correction. ZeRO-1/2 with `round_robin_gradients` (our zero2 profiles have it) reorders the parameters in
the flat partition buffers, but DeepSpeed 0.19.8 records `param_slice_mappings` (where each parameter's fragment
lies in a rank's partition) in the original order whenever no alignment padding is needed (nearly always), so
ds_to_universal cuts the wrong slices: every weight but the first and last of a partition comes out scrambled.
The mappings are recomputed here from the checkpoint's own `param_shapes` (saved in the reordered order) and
alignment paddings before the stock converter reads them.

The check. ZeRO-1/2 checkpoints also hold the full model weights (mp_rank_00_model_states.pt): every converted
fp32 parameter is compared with them on a sample of elements (within the 16-bit rounding), so a wrong mapping
fails the conversion instead of being trained on.

Run as its own process by training/universal.py (a clean interpreter: no process group, no CUDA context, safe to
fork the converter's workers).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO-1/2 without tensor or pipeline parallelism
SAMPLE = 4096  # elements compared per parameter


def fragment_mappings(param_shapes: list[dict], paddings: list[list[int]], partition_sizes: list[int],
                      dp_index: int) -> list[dict[str, tuple[int, int]]]:
    """{name: (start in this rank's partition, numel)} per group, for the parameters in rank `dp_index`'s partition.

    `param_shapes` and `paddings` are in the flat buffer's order (after round-robin reordering); a parameter
    occupies [offset, offset + numel) of the group's flat buffer, followed by its alignment padding; rank d holds
    [d * size, (d + 1) * size)."""
    out = []
    for shapes, pads, size in zip(param_shapes, paddings, partition_sizes):
        lo, hi = dp_index * size, (dp_index + 1) * size
        offset, group = 0, {}
        for (name, shape), pad in zip(shapes.items(), pads):
            numel = _numel(shape)
            start, end = max(offset, lo), min(offset + numel, hi)
            if start < end:
                group[name] = (start - lo, end - start)
            offset += numel + pad
        out.append(group)
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def install_mapping_fix(param_shapes: list[dict]) -> None:
    """Make DeepSpeedCheckpoint hand ds_to_universal the recomputed mappings (forked workers inherit it)."""
    from deepspeed.checkpoint import deepspeed_checkpoint as dc
    from deepspeed.checkpoint.constants import (OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)
    from deepspeed.utils.tensor_fragment import fragment_address

    original = dc.DeepSpeedCheckpoint.get_zero_checkpoint_state

    def corrected(self, pp_index, tp_index, dp_index, strip_tensor_paddings=True):
        sd = original(self, pp_index, tp_index, dp_index, strip_tensor_paddings)
        optim = sd[OPTIMIZER_STATE_DICT]
        sizes = [t.numel() for t in optim[SINGLE_PARTITION_OF_FP32_GROUPS]]
        paddings = optim.get("param_alignment_paddings") or [[0] * len(s) for s in param_shapes]
        fixed = fragment_mappings(param_shapes, paddings, sizes, dp_index)
        optim[PARAM_SLICE_MAPPINGS] = [{n: fragment_address(numel=k, start=s) for n, (s, k) in g.items()} for g in fixed]
        return sd

    dc.DeepSpeedCheckpoint.get_zero_checkpoint_state = corrected


def verify(output: Path, module: dict) -> None:
    """Every converted fp32 weight equals the checkpoint's model weight (up to its 16-bit rounding)."""
    import torch

    for name, lp in module.items():
        path = output / "zero" / name / "fp32.pt"
        if not path.is_file():
            raise SystemExit(f"universal conversion check failed: {name} has no fp32.pt in {output}")
        hp = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["param"].detach().flatten()
        ref = lp.detach().flatten()
        if hp.numel() != ref.numel():
            raise SystemExit(f"universal conversion check failed: {name} has {hp.numel()} values, the model {ref.numel()}")
        idx = torch.linspace(0, ref.numel() - 1, min(ref.numel(), SAMPLE)).long()
        a, b = hp[idx].float(), ref[idx].float()
        rtol = 0.0 if ref.dtype == torch.float32 else 2.0 ** -7
        worst = ((a - b).abs() - rtol * b.abs()).max().item()
        if worst > 1e-6:
            raise SystemExit(f"universal conversion check failed: {name} differs from the checkpoint's weights "
                             f"by up to {worst:.3g} (a wrong partition mapping)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune_launch.training.zero_universal", description=__doc__.split("\n")[0])
    p.add_argument("input_folder", type=Path, help="the ZeRO tag folder, e.g. checkpoint-100/global_step100")
    p.add_argument("output_folder", type=Path, help="the universal folder to write, e.g. .../global_step100_universal")
    p.add_argument("--workers", type=int, default=1, help="extract workers (merge workers: half)")
    args = p.parse_args(argv)

    import torch
    from deepspeed.checkpoint import ds_to_universal

    module = None
    model_file = args.input_folder / MODEL_FILE
    if model_file.is_file():
        state = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
        zero = (state.get("ds_config") or {}).get("zero_optimization") or {}
        if zero.get("round_robin_gradients") and int(state.get("dp_world_size") or 1) > 1:
            install_mapping_fix(state["param_shapes"])
            print("round_robin_gradients checkpoint: partition mappings recomputed from param_shapes", flush=True)
        module = state.get("module")
    multiprocessing.set_start_method("fork", force=True)  # the workers must inherit the fix
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(args.input_folder), output_folder=str(args.output_folder), num_extract_workers=args.workers,
        num_merge_workers=max(1, args.workers // 2), keep_temp_folder=False, strict=True, inject_missing_state=True))
    if module is not None:
        verify(args.output_folder, module)
        print(f"checked {len(module)} parameters against {model_file.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
