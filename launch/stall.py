"""Stall detection as pure functions of heartbeats, times and stacks: no files, no processes, no clocks.

- `StallTracker.observe(now, beats)` notes, on the launcher's own clock, when each rank's progress and its
  writes last moved (so clocks of other machines never matter).
- `StallTracker.check(now)`: the job has stalled when every rank it watches has gone longer without progress
  than its phase allows (`phase_limit`). A rank that waits legitimately for a peer that still progresses
  (rank 0 tokenizing while the others sit in a barrier) never makes the job stall. A rank expected on this
  node but never heard from counts as 'starting' since the launch began.
- `culprits(stall, stacks)` and `stall_lines(...)`: which rank stalled, in which phase and at which step, and
  where every other rank waits, from the stacks captured by `launch/stacks.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tune_launch.heartbeat import FINAL_PHASES, Heartbeat
from tune_launch.launch.stacks import RankStack

FROZEN_AFTER_S = 12.0  # no write at all (not even the 5 s pulse) for this long: the process or its node is frozen


@dataclass(frozen=True)
class Limits:
    """Seconds without progress each phase allows; the defaults are the YAML's (`watchdog:`, `from_config`)."""

    train_step_s: float
    step_factor: float
    timed_steps: int
    first_steps_s: float
    phases: Mapping[str, float]

    @classmethod
    def from_config(cls, w) -> Limits:
        """From a `training.schema.WatchdogConfig`."""
        return cls(w.train_step_s, w.step_factor, w.timed_steps, w.first_steps_s,
                   {"starting": w.starting_s, "data": w.data_s, "model_load": w.model_load_s, "eval": w.eval_s,
                    "save": w.save_s, "consolidate": w.consolidate_s})


def phase_limit(beat: Heartbeat | None, limits: Limits) -> tuple[float, str]:
    """How long this rank may go without progress where it is, and why (for the message)."""
    if beat is None:
        return limits.phases["starting"], "starting, no heartbeat yet"
    if beat.phase == "train":
        if beat.steps_timed >= limits.timed_steps and beat.step_s > 0:
            derived = limits.step_factor * beat.step_s
            if derived > limits.train_step_s:
                return derived, f"a training step: {limits.step_factor:g} x the median step of {beat.step_s:.2f} s"
            return limits.train_step_s, (f"a training step: at least {limits.train_step_s:g} s "
                                         f"({limits.step_factor:g} x the median step of {beat.step_s:.2f} s is less)")
        return limits.first_steps_s, "the first training steps"
    if beat.phase in FINAL_PHASES:
        return limits.phases["starting"], f"finishing ({beat.phase})"
    name = beat.phase if beat.phase in limits.phases else "starting"
    return limits.phases[name], beat.phase.replace("_", " ")


@dataclass(frozen=True)
class RankStall:
    """One rank at the moment of the stall."""

    rank: int
    node: int
    where: str  # 'train step 7/400'
    step: int
    idle_s: float  # since its progress last moved
    limit_s: float
    why: str
    silent_s: float  # since anything was last written (the pulse included)
    pid: int = 0
    seen: bool = True  # a heartbeat of this launch was read
    phase: str = "starting"

    @property
    def frozen(self) -> bool:
        return not self.seen or self.silent_s > FROZEN_AFTER_S


@dataclass(frozen=True)
class Stall:
    at: float
    ranks: tuple[RankStall, ...]

    @property
    def idle_s(self) -> float:
        return min(r.idle_s for r in self.ranks)

    @property
    def binding(self) -> RankStall:
        """The rank whose limit ran out last (the limit the job was held to)."""
        return max(self.ranks, key=lambda r: r.limit_s)


@dataclass
class _View:
    beat: Heartbeat | None
    progress_at: float
    written_at: float


class StallTracker:
    """When each watched rank last made progress and last wrote, on the launcher's clock."""

    def __init__(self, limits: Limits, expected: Iterable[int], node_of: Mapping[int, int], started_at: float) -> None:
        self.limits = limits
        self.node_of = dict(node_of)
        self.views: dict[int, _View] = {r: _View(None, started_at, started_at) for r in expected}

    def observe(self, now: float, beats: Mapping[int, Heartbeat]) -> None:
        for rank, beat in beats.items():
            view = self.views.get(rank)
            if view is None:
                self.views[rank] = _View(beat, now, now)
                continue
            old = view.beat
            if old is None or (beat.pid, beat.progress, beat.phase) != (old.pid, old.progress, old.phase):
                view.progress_at = now
            if old is None or beat.signature != old.signature:
                view.written_at = now
            view.beat = beat

    def shift(self, gap_s: float) -> None:
        """The launcher itself was stopped for `gap_s` (a suspended SLURM job stops every process, then resumes
        them): that time was nobody's stall."""
        for view in self.views.values():
            view.progress_at += gap_s
            view.written_at += gap_s

    def snapshot(self, now: float) -> Stall:
        ranks = []
        for rank, v in sorted(self.views.items()):
            limit, why = phase_limit(v.beat, self.limits)
            b = v.beat
            ranks.append(RankStall(rank, b.node if b else self.node_of.get(rank, 0), b.where if b else "starting",
                                   b.step if b else 0, now - v.progress_at, limit, why, now - v.written_at,
                                   b.pid if b else 0, seen=b is not None, phase=b.phase if b else "starting"))
        return Stall(now, tuple(ranks))

    def check(self, now: float, slack_s: float = 0.0) -> Stall | None:
        """A Stall when every watched rank is past its limit (+ `slack_s`), else None."""
        if not self.views:
            return None
        snap = self.snapshot(now)
        if all(r.idle_s > r.limit_s + slack_s for r in snap.ranks):
            return snap
        return None


# --------------------------------------------------------------------------- who is to blame

def culprits(stall: Stall, stacks: Mapping[int, RankStack]) -> list[int]:
    """The ranks that hold the job up: stopped or frozen ones; else those not waiting in a collective while
    others are; else those behind the others' step. Empty when the stacks do not tell."""
    frozen = [r.rank for r in stall.ranks if (r.rank in stacks and stacks[r.rank].stopped) or
              (r.rank not in stacks and r.frozen)]
    if frozen:
        return frozen
    known = {r: s for r, s in stacks.items() if s.waiting is not None}
    busy = [r for r, s in sorted(known.items()) if not s.waiting]
    if busy and (len(busy) < len(stall.ranks) or len(stall.ranks) == 1):
        return busy
    steps = {r.step for r in stall.ranks}
    if len(steps) > 1:
        low = min(steps)
        return [r.rank for r in stall.ranks if r.step == low]
    return []


def rank_line(r: RankStall, stack: RankStack | None) -> str:
    where = stack.where() if stack is not None else (
        f"no heartbeat for {r.silent_s:.0f} s (frozen or gone)" if r.frozen else "stack not captured")
    pid = f", pid {r.pid}" if r.pid else ""
    return f"rank {r.rank} (node {r.node}{pid}): {r.where}, no progress for {r.idle_s:.0f} s: {where}"


def stall_lines(stall: Stall, stacks: Mapping[int, RankStack], report: str | None, checkpoint: str | None,
                requeue: bool, reason: str | None = None) -> tuple[str, ...]:
    """The verdict of a stall: the limit, one line per rank, where the stacks are, then one error line.
    `reason`: why the job was ended when it was not the limit (a stop signal a stopped rank cannot answer)."""
    b = stall.binding
    lines = [f"[tune-launch] {reason}" if reason else
             f"[tune-launch] stall: no rank made progress for {stall.idle_s:.0f} s (limit {b.limit_s:.0f} s for {b.why})"]
    blamed = culprits(stall, stacks)
    for r in sorted(stall.ranks, key=lambda r: (r.rank not in blamed, r.rank)):
        lines.append(f"[tune-launch]   {'*' if r.rank in blamed else ' '} {rank_line(r, stacks.get(r.rank))}")
    if report:
        lines.append(f"[tune-launch] stacks of every rank: {report}")
    kept = (f"the newest complete checkpoint, {checkpoint}, is kept" if checkpoint else "no complete checkpoint yet")
    then = "requeueing the job (it resumes from it)" if requeue else "run the same command to resume from it"
    by_rank = {r.rank: r for r in stall.ranks}
    if blamed:
        first = by_rank[blamed[0]]
        others = [r for r in stall.ranks if r.rank not in blamed]
        who = ", ".join(f"rank {r} (node {by_rank[r].node})" for r in blamed)
        stack = stacks.get(first.rank)
        how = stack.where() if stack is not None else rank_line(first, None).rsplit(": ", 1)[-1]
        tail = f"; {len(others)} other rank(s) wait for it" if others else ""
        ahead = max((r for r in stall.ranks if r.phase == first.phase), key=lambda r: r.step)
        where = first.where if ahead.step <= first.step else f"{ahead.where} (its last heartbeat: {first.where})"
        head = f"{who} stalled in {where}: {how}{tail}"
    else:
        head = f"every rank stalled in {b.where} (the stacks above show where each waits)"
    ended = "the job was stopped at once" if reason else f"the job was stopped after {stall.idle_s:.0f} s without progress"
    lines.append(f"tune-launch: error: {head}; {ended}; {kept}; {then if checkpoint or requeue else 'rerun the same command'}")
    return tuple(lines)
