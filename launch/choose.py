"""Pick the fastest profile that fits, from a table of memory estimates. Pure functions of data.

Order of preference follows the profiles' relative speeds: DDP, then ZeRO-2, then full sharding (FSDP, ZeRO-3),
then the same with gradient checkpointing, then optimizer offload, then parameter offload (offload only where
the node's CPU RAM holds what is moved there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tune_launch.errors import TuneLaunchError
from tune_launch.launch.hardware import Hardware
from tune_launch.units import GIB
from tune_launch.launch.memory import MemoryEstimate, Workload, estimate_memory, gpu_budget_bytes, supports
from tune_launch.launch.model_facts import ModelFacts
from tune_launch.profiles import PROFILES, Profile

CHECKPOINTING_SPEED = 0.75  # recomputing the forward costs about a third more compute
CPU_RAM_USABLE = 0.9
AUTO_MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class Candidate:
    """One row of the plan table."""

    profile: Profile
    estimate: MemoryEstimate
    fits_gpu: bool
    fits_cpu: bool
    speed: float

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    @property
    def label(self) -> str:
        """The row's name in tables and reasons: the profile, '+gc' with gradient checkpointing."""
        return self.profile.name + (" +gc" if self.estimate.gradient_checkpointing else "")


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    micro_batch_size: int
    reason: str
    table: tuple[Candidate, ...]


def candidate_profiles(world_size: int) -> list[Profile]:
    """Profiles worth considering on `world_size` GPUs (sharding over one GPU saves nothing without offload)."""
    if world_size <= 1:
        names = ["single-gpu", "zero2-offload", "zero3-offload", "fsdp-offload"]
    else:
        names = ["ddp", "zero2", "fsdp", "zero3", "zero2-offload", "zero3-offload", "fsdp-offload"]
    return [PROFILES[n] for n in names]


def build_table(facts: ModelFacts, hw: Hardware, workload: Workload, checkpointing: bool | None) -> list[Candidate]:
    """Every candidate profile x gradient checkpointing (when `checkpointing` is None, both)."""
    world = hw.total_gpus
    budget = gpu_budget_bytes(hw.gpu_memory_gib)
    cpu_budget = hw.cpu_ram_gib * GIB * CPU_RAM_USABLE if hw.cpu_ram_gib else float("inf")
    options = [False, True] if checkpointing is None else [checkpointing]
    rows = []
    for profile in candidate_profiles(world):
        if not supports(profile, workload):
            continue
        for gc in options:
            est = estimate_memory(profile, facts, world, hw.gpus_per_node, replace(workload, gradient_checkpointing=gc))
            speed = profile.relative_speed * (CHECKPOINTING_SPEED if gc else 1.0)
            rows.append(Candidate(profile, est, est.total <= budget, est.cpu_ram <= cpu_budget, speed))
    return rows


def _best(rows: list[Candidate]) -> Candidate | None:
    fitting = [r for r in rows if r.fits]
    return max(fitting, key=lambda r: r.speed) if fitting else None


def choose_profile(facts: ModelFacts, hw: Hardware, workload: Workload, checkpointing: bool | None = None,
                   auto_micro_batch: bool = False) -> Choice:
    """The fastest fitting profile; with `auto_micro_batch`, also the largest micro batch that keeps it fitting."""
    if not hw.has_gpu:
        raise TuneLaunchError("no GPU to plan for: pass --hardware FILE (see `tune-launch detect --json`) or use --cpu")
    base = replace(workload, micro_batch_size=1) if auto_micro_batch else workload
    rows = build_table(facts, hw, base, checkpointing)
    best = _best(rows)
    if best is None:
        raise TuneLaunchError(_nothing_fits_message(facts, hw, base, rows))
    micro = workload.micro_batch_size
    if auto_micro_batch:
        micro = largest_micro_batch(best, facts, hw, workload)
        est = estimate_memory(best.profile, facts, hw.total_gpus, hw.gpus_per_node,
                              replace(workload, micro_batch_size=micro, gradient_checkpointing=best.estimate.gradient_checkpointing))
        best = replace(best, estimate=est)
        rows = [best if (r.profile == best.profile and r.estimate.gradient_checkpointing == est.gradient_checkpointing) else r for r in rows]
    return Choice(best, micro, _reason(best, rows, hw), tuple(rows))


def largest_micro_batch(best: Candidate, facts: ModelFacts, hw: Hardware, workload: Workload) -> int:
    budget = gpu_budget_bytes(hw.gpu_memory_gib)
    for mb in AUTO_MICRO_BATCHES:
        est = estimate_memory(best.profile, facts, hw.total_gpus, hw.gpus_per_node,
                              replace(workload, micro_batch_size=mb, gradient_checkpointing=best.estimate.gradient_checkpointing))
        if est.total <= budget:
            return mb
    return 1


def _reason(best: Candidate, rows: list[Candidate], hw: Hardware) -> str:
    budget = gpu_budget_bytes(hw.gpu_memory_gib) / GIB
    faster = [r for r in rows if r.speed > best.speed]
    why_not = ""
    if faster:
        top = max(faster, key=lambda r: r.speed)
        if not top.fits_gpu:
            why_not = f"; {top.label} would need {top.estimate.total_gib:.1f} GiB"
        else:
            why_not = f"; {top.label} would need {top.estimate.cpu_ram_gib:.0f} GiB of CPU RAM (have {hw.cpu_ram_gib:.0f})"
    return (f"{best.label} is the fastest profile that fits: {best.estimate.total_gib:.1f} of {budget:.1f} GiB "
            f"usable per GPU{why_not}")


def _nothing_fits_message(facts: ModelFacts, hw: Hardware, workload: Workload, rows: list[Candidate]) -> str:
    budget = gpu_budget_bytes(hw.gpu_memory_gib) / GIB
    smallest = min(rows, key=lambda r: r.estimate.total)
    ideas = []
    if workload.finetune == "full":
        for mode in ("lora", "qlora"):
            lora_facts = facts if facts.lora_params else replace(facts, lora_params=_default_lora_params(facts))
            alt = build_table(lora_facts, hw, replace(workload, finetune=mode), None)
            if _best(alt):
                ideas.append(f"{mode.upper()} fits ({_best(alt).label}, {_best(alt).estimate.total_gib:.1f} GiB)")
                break
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = hw.with_gpus(hw.gpus_per_node, hw.nodes * factor) if hw.gpus_per_node >= 8 else hw.with_gpus(hw.gpus_per_node * factor)
        alt = _best(build_table(facts, bigger, workload, None))
        if alt:
            ideas.append(f"{bigger.total_gpus} GPUs fit ({alt.label}, {alt.estimate.total_gib:.1f} GiB each)")
            break
    if workload.micro_batch_size > 1 or workload.seq_len > 512:
        ideas.append("a smaller train.micro_batch_size or max_length")
    return (f"nothing fits: {facts.num_params / 1e9:.2f}B parameters, the smallest plan ({smallest.label}) needs "
            f"{smallest.estimate.total_gib:.1f} GiB per GPU and {smallest.estimate.cpu_ram_gib:.0f} GiB CPU RAM, "
            f"budget {budget:.1f} GiB per GPU x {hw.total_gpus} and {hw.cpu_ram_gib:.0f} GiB RAM per node; "
            f"would fit: {'; '.join(ideas) if ideas else 'nothing within 64x the GPUs'}")


def _default_lora_params(facts: ModelFacts, r: int = 16) -> int:
    """Adapter size for rank-16 LoRA on all linear layers, when the YAML has no LoRA section."""
    h, i, kv = facts.hidden_size, facts.intermediate_size, facts.kv_size
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    return per_layer * facts.num_layers
