"""How a fixed global batch splits into micro batch x processes x gradient accumulation.

Shared by the launcher (the plan appends the accumulation it decided) and the ranks (which decide again on
resume, when the world size may differ from the one that wrote the checkpoint). Pure functions.
"""

from __future__ import annotations

from tune_launch.errors import TuneLaunchError

FIELD = "train.global_batch_size"


def accumulation_for(global_batch: int, micro: int, world: int) -> int:
    """Gradient accumulation that keeps `global_batch` = micro x world x accumulation; one line naming what
    would work when no whole number does."""
    if global_batch % (micro * world) == 0:
        return global_batch // (micro * world)
    raise TuneLaunchError(f"{FIELD} {global_batch} cannot be split over {world} process(es) with micro batch {micro}: "
                          f"it is not a multiple of {micro} x {world} = {micro * world}; {what_would(global_batch, micro, world)}")


def what_would(global_batch: int, micro: int, world: int) -> str:
    return "what would: " + "; ".join(alternatives(global_batch, micro, world))


def alternatives(global_batch: int, micro: int, world: int) -> list[str]:
    """The nearest settings that do divide: a smaller micro batch, another global batch, other process counts."""
    options = []
    smaller = dividing_micro_batch(global_batch, world, micro)
    if smaller is not None:
        options.append(f"train.micro_batch_size {smaller}")
    unit = micro * world
    lower, upper = (global_batch // unit) * unit, (global_batch // unit + 1) * unit
    options.append(f"{FIELD} " + " or ".join(str(v) for v in (lower, upper) if v > 0))
    worlds = process_counts(global_batch, micro, limit=max(2 * world, 8))
    if worlds:
        listed = ", ".join(map(str, worlds[:-1])) + (" or " if len(worlds) > 1 else "") + str(worlds[-1])
        options.append(f"{listed} process{'es' if worlds != [1] else ''}")
    return options


def dividing_micro_batch(global_batch: int, world: int, cap: int) -> int | None:
    """The largest micro batch <= cap that splits `global_batch` over `world` processes evenly (None if none)."""
    for micro in range(min(cap, global_batch), 0, -1):
        if global_batch % (micro * world) == 0:
            return micro
    return None


def process_counts(global_batch: int, micro: int, limit: int) -> list[int]:
    """Process counts up to `limit` on which `global_batch` splits with this micro batch."""
    if global_batch % micro:
        return []
    per_micro = global_batch // micro
    return [w for w in range(1, limit + 1) if per_micro % w == 0]
