"""Preflight: combinations that cannot work, caught before any process starts.

Each check is a pure function of the typed training config, the `LaunchPlan`, the `Hardware` and a
`Probes` record (what `gather_probes` measured: port, output folder, data size), and returns at most
one `Finding` with a one-line explanation and the fix. `gather_probes` is the only code here that
touches the machine, so every check is testable with injected facts.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tune_launch.batching import alternatives
from tune_launch.errors import TuneLaunchError
from tune_launch.filesystems import LOCAL_FS_TYPES, SHARED_FS_ENV, filesystem_type, nearest_existing  # noqa: F401 (re-exported)
from tune_launch.launch.build_locks import stale_build_locks, stale_lock_finding
from tune_launch.launch.hardware import Hardware
from tune_launch.launch.model_facts import ModelFacts
from tune_launch.launch.plan import LaunchPlan
from tune_launch.training.schema import TrainingConfig
from tune_launch.training.settings import DTYPE_OF_PRECISION
from tune_launch.units import GIB
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800  # TrainingArguments.ddp_timeout default
TOKENIZE_BYTES_PER_S = 4 * 1024**2  # data preparation per process, order of magnitude (bench/data.py: 2-6 MB/s of jsonl)
GPU_IDLE_WARN_S = 600  # a miss that keeps the GPUs idle longer than this is worth a separate CPU job
Severity = Literal["error", "warning"]


class PreflightError(TuneLaunchError):
    """At least one preflight check failed: the launch would waste the allocation."""


@dataclass(frozen=True)
class Finding:
    """One problem: which check, how bad, what is wrong (one line) and what to do (one line)."""

    check: str
    severity: Severity
    message: str
    fix: str

    def line(self) -> str:
        return f"preflight {self.check}: {self.message}; fix: {self.fix}"

    def __str__(self) -> str:
        return self.line()


@dataclass(frozen=True)
class Probes:
    """Facts about the machine the checks need; None means 'not measured' and the check is skipped."""

    port_in_use: bool | None = None
    output_writable: bool | None = None
    output_probe_path: str | None = None  # the folder actually tested (nearest existing ancestor)
    output_fs_type: str | None = None
    data_bytes: int | None = None  # local training data on disk (hub datasets unknown)
    data_prepared: bool | None = None  # the data cache already holds this YAML's data (a hit: nothing to prepare)
    accelerate_config: Mapping[str, Any] = field(default_factory=dict)
    deepspeed_config: Mapping[str, Any] = field(default_factory=dict)
    num_params: int | None = None
    trainable_params: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    nodes_share_machine: bool | None = None  # node 0's address is a loopback address: every "node" is this machine
    stale_build_locks: tuple[str, ...] | None = None  # launch/build_locks.py


# --------------------------------------------------------------------------- helpers (pure)

def reentrant(cfg: TrainingConfig) -> bool:
    """Reentrant activation checkpointing was asked for (transformers 5 defaults to non-reentrant)."""
    return bool((cfg.train.gradient_checkpointing_kwargs or {}).get("use_reentrant", False))


def collective_timeout_s(cfg: TrainingConfig) -> int:
    return int(cfg.train.ddp_timeout or DEFAULT_COLLECTIVE_TIMEOUT_S)


def checkpoint_bytes(cfg: TrainingConfig, plan: LaunchPlan, probes: Probes) -> float | None:
    """Bytes one checkpoint takes: weights in the save dtype plus fp32 optimizer state (and master weights)."""
    if probes.num_params is None:
        return None
    weight = 4 if plan.settings.weights_dtype == "float32" else 2
    if cfg.model.lora is not None:
        trainable = probes.trainable_params or 0
        return trainable * (4 + 8) + 64 * 1024**2  # adapters + Adam, plus tokenizer/config/rng slack
    master = 4 if plan.profile.strategy == "deepspeed" and weight == 2 else 0
    extra_model = weight if plan.profile.zero_stage == 3 else 0  # ZeRO-3 also writes the gathered 16-bit model
    return probes.num_params * (weight + master + 8 + extra_model)


# --------------------------------------------------------------------------- the checks

def check_qlora_fsdp(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    q = cfg.model.quantization
    if q is None or q.bits != 4 or plan.profile.strategy != "fsdp":
        return None
    if q.quant_storage != q.compute_dtype:
        return Finding("qlora-fsdp", "error",
                       f"QLoRA with {plan.profile.name} shards the 4-bit weights only when "
                       f"model.quantization.quant_storage ({q.quant_storage}) matches compute_dtype ({q.compute_dtype}); "
                       "uint8 storage is left unsharded on every GPU or breaks the flat parameters",
                       f"set model.quantization.quant_storage: {q.compute_dtype}")
    return None


def check_qlora_zero3(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    q = cfg.model.quantization
    if q is None or q.bits != 4 or plan.profile.zero_stage != 3:
        return None
    if q.quant_storage != q.compute_dtype:
        return Finding("qlora-zero3", "error",
                       f"QLoRA with ZeRO-3 ({plan.profile.name}) partitions the 4-bit weights as "
                       f"{q.quant_storage}, which DeepSpeed cannot gather next to {q.compute_dtype} parameters",
                       f"set model.quantization.quant_storage: {q.compute_dtype}")
    ds = probes.accelerate_config.get("deepspeed_config") or {}
    if isinstance(ds, Mapping) and ds.get("zero3_init_flag") is False:
        return Finding("qlora-zero3", "error",
                       f"QLoRA with ZeRO-3 needs zero3_init_flag: true so the quantized model is loaded partitioned "
                       f"(accelerate config {plan.profile.accelerate_config} has false)",
                       "set deepspeed_config.zero3_init_flag: true in the accelerate config or use the shipped profile")
    dtype = DTYPE_OF_PRECISION[plan.settings.precision]
    if dtype != q.compute_dtype:
        return Finding("qlora-zero3", "error",
                       f"QLoRA with ZeRO-3 runs DeepSpeed in {dtype} (train.precision) but the 4-bit weights "
                       f"compute in {q.compute_dtype}; ZeRO-3 needs one dtype for all partitioned parameters",
                       f"set train.precision to match model.quantization.compute_dtype ({q.compute_dtype})")
    return None


def check_int8_sharding(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    q = cfg.model.quantization
    if q is None or q.bits != 8 or not (plan.profile.strategy == "fsdp" or plan.profile.zero_stage == 3):
        return None
    return Finding("int8-sharding", "error",
                   f"8-bit (LLM.int8) weights cannot be sharded by {plan.profile.name}: FSDP flattens parameters of one "
                   "dtype per unit ('Must flatten tensors with uniform dtype'), ZeRO-3 partitions only floating-point ones",
                   "use --profile ddp or zero2 (the 8-bit base is replicated, 1 byte per weight), or 4-bit QLoRA "
                   "(drop load_in_8bit; set model.quantization.quant_storage: bfloat16) to shard it")


def check_hub(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    hub = getattr(cfg, "hub", None)
    if hub is None or plan.node_rank != 0:  # node 0 pushes: its launcher at the end, its rank 0 the checkpoints
        return None
    if probes.env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return Finding("hub", "error", f"hub.model_id {hub.model_id}: HF_HUB_OFFLINE is set, so nothing can be pushed "
                       "after training", "unset HF_HUB_OFFLINE, or drop the hub section")
    if not (probes.env.get("HF_TOKEN") or "").strip():
        return Finding("hub", "error", f"hub.model_id {hub.model_id}: no HF_TOKEN in the environment; the push would "
                       "fail after the whole run (tune-launch reads the token only from the environment)",
                       "export HF_TOKEN with a write token for that namespace (https://huggingface.co/settings/tokens)")
    return None


def check_checkpointing(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    if not plan.settings.gradient_checkpointing:
        return None
    if plan.profile.zero_stage == 3 and reentrant(cfg):
        return Finding("checkpointing-zero3", "error",
                       "gradient checkpointing with ZeRO-3 and reentrant checkpointing re-gathers partitioned "
                       "parameters outside DeepSpeed's hooks (wrong or missing gradients, 'already reduced' errors)",
                       "set train.gradient_checkpointing_kwargs: {use_reentrant: false}")
    ds_ac = probes.deepspeed_config.get("activation_checkpointing") if probes.deepspeed_config else None
    if plan.profile.zero_stage == 3 and isinstance(ds_ac, Mapping) and ds_ac:
        return Finding("checkpointing-zero3", "error",
                       "gradient checkpointing is on both in the training YAML and in the DeepSpeed JSON's "
                       "activation_checkpointing (reentrant deepspeed.checkpointing): layers are checkpointed twice",
                       "remove activation_checkpointing from the DeepSpeed JSON and keep train.gradient_checkpointing")
    fsdp = probes.accelerate_config.get("fsdp_config") or {}
    if plan.profile.strategy == "fsdp" and isinstance(fsdp, Mapping) and fsdp.get("fsdp_activation_checkpointing"):
        return Finding("checkpointing-fsdp", "error",
                       "gradient checkpointing is on both in the training YAML and in the FSDP config "
                       "(fsdp_activation_checkpointing); transformers refuses the pair at start-up",
                       "set train.gradient_checkpointing: false or fsdp_activation_checkpointing: false")
    return None


def check_global_batch(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    """train.global_batch_size fixes micro batch x processes x accumulation; the plan derives the accumulation
    (and lowers an `auto` micro batch to one that divides), so only a global batch no accumulation gives is wrong."""
    target = cfg.train.global_batch_size
    if not target:
        return None
    mb, world = plan.settings.micro_batch_size, plan.world_size
    if target % (mb * world) == 0:
        return None
    return Finding("global-batch", "error",
                   f"train.global_batch_size {target} is not a multiple of micro batch {mb} x {world} processes "
                   f"= {mb * world}: no whole gradient accumulation gives it",
                   "use " + ", or ".join(alternatives(target, mb, world)))


def check_build_locks(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    found = stale_lock_finding(probes.stale_build_locks, plan.profile.strategy == "deepspeed")
    return Finding("build-lock", "error", *found) if found else None


def check_port(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    if plan.world_size < 2 or plan.main_process_port in (None, 0) or plan.node_rank != 0 or not probes.port_in_use:
        return None
    return Finding("port", "error",
                   f"--main-process-port {plan.main_process_port} is already in use on this node; accelerate would "
                   "silently switch to a random port that the other nodes never find",
                   "pick a free --main-process-port (or leave it out on one node to get a free one)")


def check_output_dir(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    if probes.output_writable is False:
        return Finding("output-dir", "error",
                       f"output_dir {cfg.output_dir}: cannot write in {probes.output_probe_path or cfg.output_dir}; "
                       "the first checkpoint would fail after the whole warm-up",
                       "point output_dir at a writable folder (output_dir=... override) or fix its permissions")
    fs = (probes.output_fs_type or "").lower()
    if plan.nodes > 1 and fs in LOCAL_FS_TYPES and probes.env.get(SHARED_FS_ENV) != "1" and not probes.nodes_share_machine:
        return Finding("output-dir", "error",
                       f"output_dir {cfg.output_dir} is on a local {fs} filesystem but {plan.nodes} nodes write "
                       "checkpoint shards into it: each node would hold a different part and resume would fail",
                       f"put output_dir on a shared filesystem (NFS, Lustre, GPFS, ...), or set {SHARED_FS_ENV}=1 if it is shared")
    return None


def check_disk(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    need = checkpoint_bytes(cfg, plan, probes)
    free = hw.disk_free_gib
    if need is None or free is None:
        return None
    if free * GIB < need * 1.1:
        return Finding("disk", "error",
                       f"{free:.1f} GiB free where output_dir goes, one checkpoint needs about {need / GIB:.1f} GiB; "
                       "the first save would fail",
                       "free disk space or point output_dir at a larger filesystem")
    keep = cfg.checkpoint.save_total_limit or 0
    if keep == 1 and getattr(cfg.eval, "best_metric", None):  # the best one is kept besides the newest
        keep = 2
    if keep and free * GIB < need * (keep + 1):
        return Finding("disk", "warning",
                       f"{free:.1f} GiB free, {keep} kept checkpoints plus the one being written need about "
                       f"{need * (keep + 1) / GIB:.1f} GiB",
                       "lower checkpoint.save_total_limit or free disk space")
    return None


def check_data_prep(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> Finding | None:
    """The data is prepared once per job before training (training/coordinate.py): the other ranks wait up to
    data.prepare_timeout, and on GPUs the whole allocation idles meanwhile. A cache hit needs no time at all."""
    if cfg.data.streaming or probes.data_bytes is None or probes.data_prepared:
        return None
    procs = cfg.data.num_proc or 1
    seconds = probes.data_bytes / (TOKENIZE_BYTES_PER_S * procs)
    timeout = cfg.data.prepare_timeout
    size = f"{probes.data_bytes / GIB:.1f} GiB"
    first = "run `tune-launch prepare` with the same YAML first (a CPU job or sbatch step; training then maps the cache)"
    if plan.world_size > 1 and seconds > 0.8 * timeout:
        wanted = int(seconds * 2 // 600 + 1) * 600
        return Finding("data-prep", "error",
                       f"preparing {size} of data takes about {seconds / 60:.0f} min on one process while the other ranks "
                       f"wait at most data.prepare_timeout ({timeout / 60:.0f} min)",
                       f"{first}, or raise data.prepare_timeout to at least {wanted}, or add workers (data.num_proc)")
    if plan.device == "cuda" and seconds > GPU_IDLE_WARN_S:
        return Finding("data-prep", "warning",
                       f"preparing {size} of data takes about {seconds / 60:.0f} min while {plan.world_size} GPU(s) idle",
                       first)
    return None


CHECKS: tuple[Callable[[TrainingConfig, LaunchPlan, Hardware, Probes], Finding | None], ...] = (
    check_qlora_fsdp, check_qlora_zero3, check_checkpointing, check_global_batch, check_port,
    check_output_dir, check_disk, check_data_prep, check_int8_sharding, check_hub, check_build_locks,
)


def evaluate(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, probes: Probes) -> list[Finding]:
    """Every check on injected facts; errors first."""
    found = [f for check in CHECKS if (f := check(cfg, plan, hw, probes)) is not None]
    return sorted(found, key=lambda f: f.severity != "error")


# --------------------------------------------------------------------------- probing (the only side effects)

def resolves_to_loopback(host: str | None) -> bool | None:
    """True when `host` (node 0) is this machine's loopback, as on a one-machine dev cluster; None if unresolvable."""
    if not host:
        return None
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return None


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a requeued run is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def writable(folder: Path) -> bool:
    """Really create a file there: os.access lies on read-only mounts and for root."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tune-launch-probe-"):
            return True
    except OSError:
        return False


def local_data_bytes(cfg: TrainingConfig) -> int | None:
    sources = [*(cfg.data.train or []), *(cfg.data.eval or [])]
    if not sources or any(s.path is None for s in sources):
        return None
    total = 0
    for s in sources:
        p = Path(s.path)
        try:
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        except OSError:
            return None
    return total


def data_prepared(cfg: TrainingConfig, env: Mapping[str, str]) -> bool | None:
    """Whether the data cache already holds this YAML's prepared data (None when it cannot be told offline)."""
    from tune_launch.training.datacache import cache_root, indexed_entry
    from tune_launch.training.prepare import config_key

    key = config_key(cfg, env)
    if key is None:
        return None
    return indexed_entry(cache_root(cfg.data.cache_dir, env), key) is not None


def _read_mapping(path: Path | None) -> dict[str, Any]:
    """A shipped accelerate YAML or DeepSpeed JSON (JSON is YAML too); {} when missing or not a mapping."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path is not None else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def gather_probes(cfg: TrainingConfig, plan: LaunchPlan, env: Mapping[str, str], facts: ModelFacts | None = None) -> Probes:
    """Measure what the checks need on this node (port, output folder, data size, shipped configs)."""
    out = nearest_existing(Path(cfg.output_dir))
    port = plan.main_process_port
    busy = port_in_use(port) if port and plan.world_size > 1 and plan.node_rank == 0 else None
    return Probes(
        port_in_use=busy,
        output_writable=writable(out) if out.is_dir() else False,
        output_probe_path=str(out),
        output_fs_type=filesystem_type(out),
        data_bytes=local_data_bytes(cfg),
        data_prepared=data_prepared(cfg, env),
        accelerate_config=_read_mapping(plan.profile.accelerate_config_path),
        deepspeed_config=_read_mapping(plan.profile.deepspeed_config_path),
        num_params=facts.num_params if facts is not None else None,
        trainable_params=(facts.lora_params or None) if facts is not None else None,
        env=dict(env),
        nodes_share_machine=resolves_to_loopback(plan.main_process_ip) if plan.nodes > 1 else None,
        stale_build_locks=stale_build_locks(env) if plan.profile.strategy == "deepspeed" else None,
    )


# --------------------------------------------------------------------------- the launcher's entry points

def run_preflight(cfg: TrainingConfig, plan: LaunchPlan, hw: Hardware, env: Mapping[str, str],
                  facts: ModelFacts | None = None) -> list[Finding]:
    """Probe this node, then run every check. Called by `tune-launch plan` and before every launch."""
    return evaluate(cfg, plan, hw, gather_probes(cfg, plan, env, facts))


def raise_on_errors(findings: list[Finding]) -> list[Finding]:
    """Raise one PreflightError line naming every error; return the warnings for the caller to print."""
    errors = [f for f in findings if f.severity == "error"]
    if len(errors) == 1:
        raise PreflightError(errors[0].line())
    if errors:
        raise PreflightError(f"{len(errors)} preflight checks failed: " + " | ".join(f.line() for f in errors))
    return [f for f in findings if f.severity != "error"]


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "preflight ok: no known-bad combination"
    return "\n".join(f"{f.severity:<7} {f.line()}" for f in findings)
