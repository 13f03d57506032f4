"""From a request, a validated YAML, the hardware and the model's facts to a frozen `LaunchPlan`.

Pure: nothing here probes devices, reads the environment or starts processes. `cli` gathers the inputs,
`command` turns a plan into argv and environment, `run` executes it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

from tune_launch.launch.choose import Candidate, Choice, build_table, choose_profile
from tune_launch.errors import TuneLaunchError
from tune_launch.launch.hardware import Hardware
from tune_launch.launch.memory import Workload, gpu_budget_bytes
from tune_launch.launch.model_facts import ModelFacts
from tune_launch.launch.profiles import PROFILES, REHEARSAL_PROFILES, Profile, get_profile

CPU_MICRO_BATCH = 8


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
    overrides: tuple[str, ...]
    reason: str
    notes: tuple[str, ...] = ()
    table: tuple[Candidate, ...] = ()
    chosen: Candidate | None = None
    cpu_cores: int = 1
    output_dir: str = "outputs/run"
    budget_gib: float = 0.0
    workload: Workload | None = None  # the shape the table rows were estimated at
    micro_batch_size: int | None = None  # what the chosen row runs with

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass(frozen=True)
class Placement:
    device: str
    gpus_per_node: int
    nodes: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def place(request: LaunchRequest, hw: Hardware) -> Placement:
    """Where the job runs: the requested GPUs, or (without --strict) the largest thing this machine has."""
    if request.cpu:
        procs = request.num_processes or 1
        if procs < 1:
            raise TuneLaunchError(f"--num-processes {procs}: must be at least 1")
        nodes = request.nodes if request.nodes is not None else hw.nodes
        if nodes < 1:
            raise TuneLaunchError(f"--nodes {nodes}: must be at least 1")
        return Placement("cpu", procs, nodes)
    if request.gpus is not None and request.gpus < 1:
        raise TuneLaunchError(f"--gpus {request.gpus}: must be at least 1 (use --cpu to run without a GPU)")
    nodes = request.nodes if request.nodes is not None else hw.nodes
    if nodes < 1:
        raise TuneLaunchError(f"--nodes {nodes}: must be at least 1")
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


def workload_for(cfg, placement: Placement, hw: Hardware, micro_batch: int | None = None, checkpointing: bool = False) -> Workload:
    """The per-step shape the memory model needs, from the typed training config."""
    model = cfg.model
    finetune = "qlora" if model.quantization is not None else ("lora" if model.lora is not None else "full")
    precision = cfg.train.precision
    if precision == "auto":
        precision = "fp32" if placement.device == "cpu" else ("bf16" if hw.bf16 or not hw.has_gpu else "fp16")
    liger = cfg.train.use_liger_kernel
    fused = liger is True or (liger == "auto" and placement.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None)
    mb = micro_batch if micro_batch is not None else (cfg.train.micro_batch_size if isinstance(cfg.train.micro_batch_size, int) else 1)
    master = precision in ("fp32", "fp16") or model.dtype == "float32"
    return Workload(micro_batch_size=mb, seq_len=cfg.max_length, precision=precision, finetune=finetune,
                    gradient_checkpointing=checkpointing, fused_cross_entropy=fused, master_weights=master)


def make_plan(request: LaunchRequest, cfg, hw: Hardware, facts: ModelFacts | None) -> LaunchPlan:
    """The whole decision: placement, profile, micro batch, gradient checkpointing, rendezvous."""
    placement = place(request, hw)
    nodes, node_rank, main_ip = _rendezvous(request, placement, hw)
    notes = list(placement.notes)
    extra: list[str] = []
    table: tuple[Candidate, ...] = ()
    chosen = None
    budget = 0.0
    workload = None
    micro = None

    if placement.device == "cpu":
        profile, reason = _cpu_profile(request, placement.gpus_per_node * nodes)
        if cfg.train.micro_batch_size == "auto":
            extra.append(f"train.micro_batch_size={CPU_MICRO_BATCH}")
        if cfg.train.gradient_checkpointing == "auto":
            extra.append("train.gradient_checkpointing=false")
    else:
        if facts is None:
            raise TuneLaunchError("internal: a GPU plan needs the model's facts")
        target = hw.with_gpus(placement.gpus_per_node, nodes)
        budget = gpu_budget_bytes(target.gpu_memory_gib) / 1024**3
        gc_fixed = cfg.train.gradient_checkpointing if isinstance(cfg.train.gradient_checkpointing, bool) else None
        auto_mb = cfg.train.micro_batch_size == "auto"
        workload = workload_for(cfg, placement, target)
        if request.profile == "auto":
            choice = choose_profile(facts, target, workload, gc_fixed, auto_micro_batch=auto_mb)
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
        table, chosen, micro = choice.table, choice.candidate, choice.micro_batch_size
        workload = replace(workload, micro_batch_size=1) if auto_mb else workload
        if auto_mb:
            extra.append(f"train.micro_batch_size={choice.micro_batch_size}")
        if gc_fixed is None:
            extra.append(f"train.gradient_checkpointing={'true' if chosen.estimate.gradient_checkpointing else 'false'}")
        if placement.gpus_per_node * nodes == 1 and profile.name == "ddp":
            profile, reason = PROFILES["single-gpu"], reason + " (one GPU: single-gpu)"

    port = request.main_process_port
    if port is None and hw.slurm is not None and nodes > 1:
        from tune_launch.launch.slurm import port_from_job_id
        port = port_from_job_id(hw.slurm.job_id, hw.slurm.restart_count)  # as slurm/*.sh: a requeue gets a new port
    if nodes > 1 and port is None and not request.planning:
        raise TuneLaunchError("--main-process-port: a multi-node launch needs the same port on every node (or run inside SLURM)")
    return LaunchPlan(
        profile=profile, device=placement.device, nodes=nodes, processes_per_node=placement.gpus_per_node,
        node_rank=node_rank, main_process_ip=main_ip, main_process_port=port, config_path=request.config_path,
        overrides=tuple(request.overrides) + tuple(extra), reason=reason, notes=tuple(notes), table=table,
        chosen=chosen, cpu_cores=hw.cpu_cores, output_dir=cfg.output_dir, budget_gib=budget,
        workload=workload, micro_batch_size=micro,
    )


def _explicit_choice(profile: Profile, facts: ModelFacts, hw: Hardware, workload: Workload, gc_fixed: bool | None,
                     auto_mb: bool) -> Choice:
    rows = build_table(facts, hw, workload, gc_fixed)
    mine = [r for r in rows if r.profile.name == profile.name]
    if not mine:  # e.g. single-gpu asked on 8 GPUs: estimate it anyway
        from tune_launch.launch.choose import Candidate as _C
        from tune_launch.launch.memory import estimate_memory

        est = estimate_memory(profile, facts, hw.total_gpus, hw.gpus_per_node, workload)
        mine = [_C(profile, est, est.total <= gpu_budget_bytes(hw.gpu_memory_gib), True, profile.relative_speed)]
    pick = next((r for r in mine if r.fits), mine[0])
    mb = workload.micro_batch_size
    if auto_mb:
        from tune_launch.launch.choose import _largest_micro_batch
        mb = _largest_micro_batch(pick, facts, hw, workload)
    return Choice(pick, mb, "", tuple(rows))


def _cpu_profile(request: LaunchRequest, world: int) -> tuple[Profile, str]:
    """CPU runs: the cpu profile for one process, else a rehearsal of a multi-GPU profile on gloo."""
    if not request.cpu:  # fallback from a GPU request on a machine without one
        return PROFILES["cpu"], "one CPU process (no GPU here)"
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
        from tune_launch.launch.slurm import expand_nodelist
        ip = expand_nodelist(hw.slurm.nodelist)[0]
    if ip is None:
        if nodes > 1 and not request.planning:
            raise TuneLaunchError("--main-process-ip: a multi-node launch needs the address of node 0 (or run inside SLURM)")
        ip = "127.0.0.1"
    return nodes, node_rank, ip


def plan_batch(cfg, dev, facts: ModelFacts | None, world_size: int = 1) -> tuple[int, bool]:
    """(micro batch, gradient checkpointing) from the launcher's memory planner, for a run started without it.

    Values the YAML fixes are kept; `auto` ones are planned for this GPU as the launcher would."""
    t = cfg.train
    mb_fixed = t.micro_batch_size if isinstance(t.micro_batch_size, int) else None
    gc_fixed = t.gradient_checkpointing if isinstance(t.gradient_checkpointing, bool) else None
    if mb_fixed is not None and gc_fixed is not None:
        return mb_fixed, gc_fixed
    if dev.kind != "cuda" or not dev.memory_gib:
        return mb_fixed or 8, bool(gc_fixed)
    hw = Hardware(gpus_per_node=world_size, gpu_name=dev.name, gpu_memory_gib=dev.memory_gib, bf16=dev.bf16)
    workload = workload_for(cfg, Placement("cuda", world_size, 1), hw, micro_batch=mb_fixed or 1)
    choice = choose_profile(facts, hw, workload, gc_fixed, auto_micro_batch=mb_fixed is None)
    return choice.micro_batch_size, choice.candidate.estimate.gradient_checkpointing
