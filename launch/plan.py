"""From a request, a validated YAML, the hardware and the model's facts to a frozen `LaunchPlan`.

Pure: nothing here probes devices, reads the environment or starts processes. `cli` gathers the inputs,
`command` turns a plan into argv and environment, `run` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tune_launch.batching import dividing_micro_batch
from tune_launch.errors import TuneLaunchError
from tune_launch.launch.choose import Candidate, Choice, build_table, choose_profile, largest_micro_batch
from tune_launch.launch.hardware import Hardware
from tune_launch.launch.memory import Workload, estimate_memory, gpu_budget_bytes
from tune_launch.launch.model_facts import ModelFacts
from tune_launch.profiles import PROFILES, REHEARSAL_PROFILES, Profile, get_profile
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.reshard import ResumeFacts, resume_plan_for
from tune_launch.training.settings import CPU_MICRO_BATCH, DeviceFacts, ResolvedSettings, resolve_settings
from tune_launch.units import GIB


@dataclass(frozen=True)
class LaunchRequest:
    """What the user asked for on the command line."""

    config_path: Path
    overrides: tuple[str, ...] = ()
    profile: str = "auto"
    gpus: int | None = None  # per node
    nodes: int | None = None
    node_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    cpu: bool = False
    num_processes: int | None = None  # with cpu: processes on this machine
    strict: bool = False
    hardware_given: bool = False  # --hardware: plan for that machine, never fall back
    planning: bool = False  # `tune-launch plan`: rendezvous details are not needed

    def __post_init__(self) -> None:
        """The counts are checked here, once, before anything slow (the YAML, the hardware) is read."""
        for flag, value in (("gpus", self.gpus), ("nodes", self.nodes), ("num-processes", self.num_processes)):
            if value is not None and value < 1:
                hint = " (use --cpu to run without a GPU)" if flag == "gpus" else ""
                raise TuneLaunchError(f"--{flag} {value}: must be at least 1{hint}")
        if self.num_processes is not None and not self.cpu and not self.planning:
            raise TuneLaunchError("--num-processes goes with --cpu; on GPUs use --gpus")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to print or run the launch, for every node."""

    profile: Profile
    device: str  # "cuda" | "cpu"
    nodes: int
    processes_per_node: int
    node_rank: int
    main_process_ip: str
    main_process_port: int | None
    config_path: Path
    overrides: tuple[str, ...]  # the user's own; the resolved `auto` values are in `settings`
    reason: str
    settings: ResolvedSettings
    notes: tuple[str, ...] = ()
    table: tuple[Candidate, ...] = ()
    chosen: Candidate | None = None
    cpu_cores: int = 1
    output_dir: str = "outputs/run"
    budget_gib: float = 0.0
    workload: Workload | None = None  # the shape the table rows were estimated at
    accumulation: int | None = None  # when the global batch decides it (train.global_batch_size, a resharded resume)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def rank_overrides(self) -> tuple[str, ...]:
        """What the ranks are given after the YAML: the user's overrides, then every resolved `auto`, then the
        gradient accumulation that keeps the global batch."""
        kept = (f"train.gradient_accumulation_steps={self.accumulation}",) if self.accumulation is not None else ()
        return self.overrides + self.settings.as_overrides() + kept


@dataclass(frozen=True)
class Placement:
    device: str
    gpus_per_node: int
    nodes: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def place(request: LaunchRequest, hw: Hardware) -> Placement:
    """Where the job runs: the requested GPUs, or (without --strict) the largest thing this machine has."""
    nodes = request.nodes if request.nodes is not None else hw.nodes
    if request.cpu:
        return Placement("cpu", request.num_processes or 1, nodes)
    wanted = request.gpus or hw.gpus_per_node
    if wanted and hw.gpus_per_node >= wanted:
        return Placement("cuda", wanted, nodes)
    have = hw.gpus_per_node
    if request.strict or request.hardware_given:
        raise TuneLaunchError(
            f"--gpus {wanted or 1}: this machine has {have} GPU(s); "
            + ("drop --strict to fall back to what is here" if request.strict else "fix --gpus or the --hardware file"))
    if have >= 1:
        return Placement("cuda", have, nodes, (f"asked for {wanted} GPUs, this machine has {have}: running on {have} instead (--strict refuses)",))
    if not wanted:
        return Placement("cpu", 1, 1, ("no GPU here: one CPU process (cpu profile); `--cpu --num-processes 2 --profile P` rehearses a multi-GPU profile",))
    return Placement("cpu", 1, 1, (f"asked for {wanted} GPU(s), this machine has none: running one CPU process with the cpu profile instead (--strict refuses)",))


def device_facts(placement: Placement, hw: Hardware) -> DeviceFacts:
    """The facts `resolve_settings` needs about the devices the job will run on (from `Hardware`, not probed)."""
    if placement.device != "cuda":
        return DeviceFacts(kind="cpu", has_liger=hw.liger_kernel)
    return DeviceFacts(kind="cuda", name=hw.gpu_name, bf16=hw.bf16, memory_gib=hw.gpu_memory_gib, has_liger=hw.liger_kernel)


def workload_for(cfg: TrainingConfig, settings: ResolvedSettings, micro_batch: int | None = None,
                 checkpointing: bool = False) -> Workload:
    """The per-step shape the memory model needs, from the typed config and the resolved settings."""
    model = cfg.model
    q = model.quantization
    finetune = ("qlora" if q.bits == 4 else "lora-int8") if q is not None else ("lora" if model.lora is not None else "full")
    return Workload(micro_batch_size=micro_batch if micro_batch is not None else settings.micro_batch_size,
                    seq_len=cfg.max_length, precision=settings.precision, finetune=finetune,
                    gradient_checkpointing=checkpointing, fused_cross_entropy=settings.use_liger_kernel,
                    master_weights=settings.master_weights)


def make_plan(request: LaunchRequest, cfg: TrainingConfig, hw: Hardware, facts: ModelFacts | None,
              resume: ResumeFacts | None = None) -> LaunchPlan:
    """The whole decision: placement, profile, settings (micro batch, checkpointing, precision, ...), gradient
    accumulation, rendezvous. `resume`: the checkpoint the ranks will continue (an `auto` profile keeps its family)."""
    placement = place(request, hw)
    nodes, node_rank, main_ip = _rendezvous(request, placement, hw)
    dev = device_facts(placement, hw)
    notes = list(placement.notes)
    table: tuple[Candidate, ...] = ()
    chosen = None
    budget = 0.0
    workload = None

    world = placement.gpus_per_node * nodes
    family = resume.saved.layout if resume is not None else None
    if placement.device == "cpu":
        profile, reason = _cpu_profile(request, world, family)
        settings = resolve_settings(cfg, dev, profile, micro_batch_size=_divisor_micro(cfg, world, CPU_MICRO_BATCH))
    else:
        if facts is None:
            raise TuneLaunchError("internal: a GPU plan needs the model's facts")
        target = hw.with_gpus(placement.gpus_per_node, nodes)
        budget = gpu_budget_bytes(target.gpu_memory_gib) / GIB
        gc_fixed = cfg.train.gradient_checkpointing if isinstance(cfg.train.gradient_checkpointing, bool) else None
        auto_mb = cfg.train.micro_batch_size == "auto"
        workload = workload_for(cfg, resolve_settings(cfg, dev, PROFILES["single-gpu"]), micro_batch=None if not auto_mb else 1)
        if request.profile == "auto":
            choice = choose_profile(facts, target, workload, gc_fixed, auto_micro_batch=auto_mb)
            if family and choice.candidate.profile.layout_family != family:
                choice = _keep_family(choice, family, facts, target, workload, auto_mb, resume)
            profile, reason = choice.candidate.profile, choice.reason
        else:
            profile = get_profile(request.profile)
            if profile.name == "cpu":
                raise TuneLaunchError("--profile cpu runs on the CPU: add --cpu, or pick a GPU profile")
            choice = _explicit_choice(profile, facts, target, workload, gc_fixed, auto_mb)
            reason = f"{profile.name} requested with --profile"
            if not choice.candidate.fits:
                notes.append(f"warning: {profile.name} is estimated at {choice.candidate.estimate.total_gib:.1f} GiB per GPU "
                             f"and {choice.candidate.estimate.cpu_ram_gib:.0f} GiB CPU RAM, over the budget "
                             f"({budget:.1f} GiB, {target.cpu_ram_gib:.0f} GiB); `tune-launch plan` shows what fits")
        table, chosen = choice.table, choice.candidate
        micro = _divisor_micro(cfg, world, choice.micro_batch_size) if auto_mb else choice.micro_batch_size
        if placement.gpus_per_node * nodes == 1 and profile.name == "ddp":
            profile, reason = PROFILES["single-gpu"], reason + " (one GPU: single-gpu)"
        settings = resolve_settings(cfg, dev, profile, micro_batch_size=micro,
                                    gradient_checkpointing=chosen.estimate.gradient_checkpointing)

    accumulation, resume_note = _accumulation(cfg, settings.micro_batch_size, world, resume, profile.layout_family)
    if accumulation is not None:
        if accumulation != cfg.train.gradient_accumulation_steps and resume_note is None:
            notes.append(f"train.gradient_accumulation_steps {cfg.train.gradient_accumulation_steps} -> {accumulation}: keeps "
                         f"train.global_batch_size {cfg.train.global_batch_size} on {world} process(es)")
    if resume_note:
        notes.append(resume_note)

    port = request.main_process_port
    if port is None and hw.slurm is not None and nodes > 1:
        port = hw.slurm.main_port  # as slurm/*.sh: a requeue gets a new port
    if nodes > 1 and port is None and not request.planning:
        raise TuneLaunchError("--main-process-port: a multi-node launch needs the same port on every node (or run inside SLURM)")
    return LaunchPlan(
        profile=profile, device=placement.device, nodes=nodes, processes_per_node=placement.gpus_per_node,
        node_rank=node_rank, main_process_ip=main_ip, main_process_port=port, config_path=request.config_path,
        overrides=tuple(request.overrides), reason=reason, settings=settings, notes=tuple(notes), table=table,
        chosen=chosen, cpu_cores=hw.cpu_cores, output_dir=cfg.output_dir, budget_gib=budget, workload=workload,
        accumulation=accumulation,
    )


def _divisor_micro(cfg, world: int, cap: int) -> int:
    """An `auto` micro batch: the planned one, lowered to one that splits train.global_batch_size evenly."""
    target = cfg.train.global_batch_size
    return (dividing_micro_batch(target, world, cap) or cap) if target else cap


def _accumulation(cfg: TrainingConfig, micro: int, world: int, resume: ResumeFacts | None,
                  layout: str) -> tuple[int | None, str | None]:
    """The gradient accumulation the ranks will run (training/reshard.py decides the same), when it is not simply
    the YAML's: a kept global batch (train.global_batch_size, or a resharded checkpoint's); and the resume line.
    None when it does not divide: preflight's global-batch check (or the rank) then says what would."""
    target = cfg.train.global_batch_size
    if target and target % (micro * world):
        return None, None
    start = resume_plan_for(cfg, world, micro, resume, layout)
    note = start.line() if resume is not None else None
    return (start.batch.accumulation if start.batch.source != "train.gradient_accumulation_steps" else None), note


def _keep_family(choice: Choice, family: str, facts: ModelFacts, hw: Hardware, workload: Workload, auto_mb: bool,
                 resume: ResumeFacts) -> Choice:
    """Resuming: the fastest profile of the checkpoint's family (another family could not load it), even when
    another one would be faster on this hardware; the least memory-hungry one when none fits."""
    rows = [r for r in choice.table if r.profile.layout_family == family]
    if not rows:
        return choice
    fitting = [r for r in rows if r.fits]
    pick = max(fitting, key=lambda r: r.speed) if fitting else min(rows, key=lambda r: r.estimate.total)
    mb = workload.micro_batch_size
    if auto_mb:
        mb = largest_micro_batch(pick, facts, hw, workload)
    why = (f"{pick.profile.name}: the family of {resume.checkpoint.name}, which {choice.candidate.profile.name} "
           f"(fastest here) could not load; {pick.estimate.total_gib:.1f} GiB per GPU")
    return Choice(pick, mb, why if pick.fits else why + " (over the budget: `tune-launch plan` shows what fits)", choice.table)


def _explicit_choice(profile: Profile, facts: ModelFacts, hw: Hardware, workload: Workload, gc_fixed: bool | None,
                     auto_mb: bool) -> Choice:
    rows = build_table(facts, hw, workload, gc_fixed)
    mine = [r for r in rows if r.profile.name == profile.name]
    if not mine:  # e.g. single-gpu asked on 8 GPUs: estimate it anyway
        est = estimate_memory(profile, facts, hw.total_gpus, hw.gpus_per_node, workload)
        mine = [Candidate(profile, est, est.total <= gpu_budget_bytes(hw.gpu_memory_gib), True, profile.relative_speed)]
    pick = next((r for r in mine if r.fits), mine[0])
    mb = workload.micro_batch_size
    if auto_mb:
        mb = largest_micro_batch(pick, facts, hw, workload)
    return Choice(pick, mb, "", tuple(rows))


def _cpu_profile(request: LaunchRequest, world: int, family: str | None = None) -> tuple[Profile, str]:
    """CPU runs: the cpu profile for one process, else a rehearsal of a multi-GPU profile on gloo; resuming with
    `auto`, the rehearsal of the checkpoint's family."""
    if not request.cpu:  # fallback from a GPU request on a machine without one
        return PROFILES["cpu"], "one CPU process (no GPU here)"
    kept = {"fsdp": "fsdp", "deepspeed-zero2": "zero2", "deepspeed-zero3": "zero3"}.get(family or "")
    if request.profile == "auto" and kept:
        return PROFILES[kept], f"CPU rehearsal of {kept} with {world} gloo process(es): the checkpoint's family"
    if request.profile in ("auto", "cpu"):
        if world == 1:
            return PROFILES["cpu"], "one CPU process"
        if request.profile == "cpu":
            raise TuneLaunchError(f"--profile cpu runs one process; for {world} processes pick one of {', '.join(REHEARSAL_PROFILES)}")
        return PROFILES["ddp"], f"CPU rehearsal of ddp with {world} gloo processes"
    profile = get_profile(request.profile)
    if profile.name not in REHEARSAL_PROFILES:
        raise TuneLaunchError(
            f"--profile {profile.name}: cannot be rehearsed on CPU processes; rehearsable: {', '.join(REHEARSAL_PROFILES)}")
    return profile, f"CPU rehearsal of {profile.name} with {world} gloo process(es)"


def _rendezvous(request: LaunchRequest, placement: Placement, hw: Hardware) -> tuple[int, int, str]:
    nodes = placement.nodes
    node_rank = request.node_rank if request.node_rank is not None else (hw.slurm.node_rank if hw.slurm and nodes > 1 else 0)
    if not 0 <= node_rank < nodes:
        raise TuneLaunchError(f"--node-rank {node_rank}: must be between 0 and {nodes - 1} for --nodes {nodes}")
    ip = request.main_process_ip
    if ip is None and hw.slurm is not None and nodes > 1:
        ip = hw.slurm.main_host
    if ip is None:
        if nodes > 1 and not request.planning:
            raise TuneLaunchError("--main-process-ip: a multi-node launch needs the address of node 0 (or run inside SLURM)")
        ip = "127.0.0.1"
    return nodes, node_rank, ip


def plan_batch(cfg: TrainingConfig, dev: DeviceFacts, facts: ModelFacts | None, world_size: int = 1) -> tuple[int, bool]:
    """(micro batch, gradient checkpointing) for `world_size` GPUs like `dev`, as the launcher's plan would choose
    them (the benchmarks run the training path without the launcher). Values the YAML fixes are kept."""
    t = cfg.train
    mb_fixed = t.micro_batch_size if isinstance(t.micro_batch_size, int) else None
    gc_fixed = t.gradient_checkpointing if isinstance(t.gradient_checkpointing, bool) else None
    if (mb_fixed is not None and gc_fixed is not None) or dev.kind != "cuda" or not dev.memory_gib:
        s = resolve_settings(cfg, dev, PROFILES["single-gpu"])
        return s.micro_batch_size, s.gradient_checkpointing
    hw = Hardware(gpus_per_node=world_size, gpu_name=dev.name, gpu_memory_gib=dev.memory_gib, bf16=dev.bf16,
                  liger_kernel=dev.has_liger)
    workload = workload_for(cfg, resolve_settings(cfg, dev, PROFILES["single-gpu"]), micro_batch=mb_fixed or 1)
    choice = choose_profile(facts, hw, workload, gc_fixed, auto_micro_batch=mb_fixed is None)
    return choice.micro_batch_size, choice.candidate.estimate.gradient_checkpointing
