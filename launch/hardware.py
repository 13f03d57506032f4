"""What the job runs on. `detect_hardware` is the only code that probes devices; everything else takes a `Hardware`.

`load_hardware(path)` reads what `tune-launch detect --json` prints, or the flat form
`{"nodes": 2, "gpus_per_node": 8, "gpu_name": ..., "gpu_memory_gib": 80, "bf16": true, "cpu_ram_gib": 1024}`,
so plans for machines you are not on can be made and tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tune_launch.errors import TuneLaunchError
from tune_launch.launch.slurm import SlurmJob
from tune_launch.gpus import peak_bf16_flops  # the table lives in a leaf module: the ranks use it too (MFU)
from tune_launch.units import GIB


@dataclass(frozen=True)
class Hardware:
    """One kind of node, `nodes` times. GPU fields are None/0 on a CPU-only machine."""

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_name: str | None = None
    gpu_memory_gib: float = 0.0
    compute_capability: str | None = None
    bf16: bool = False
    peer_access: bool | None = None
    nvlink: bool | None = None
    cpu_cores: int = 1
    cpu_ram_gib: float = 0.0
    disk_free_gib: float | None = None
    slurm: SlurmJob | None = None
    liger_kernel: bool = False  # the liger_kernel package is installed where the ranks run
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def has_gpu(self) -> bool:
        return self.gpus_per_node > 0

    def with_gpus(self, gpus_per_node: int, nodes: int | None = None) -> Hardware:
        return replace(self, gpus_per_node=gpus_per_node, nodes=nodes if nodes is not None else self.nodes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_gpus"] = self.total_gpus
        data["peak_bf16_tflops"] = (peak_bf16_flops(self.gpu_name) or 0) / 1e12 or None
        return data


# --------------------------------------------------------------------------- reading a file

_FLAT_KEYS = {f for f in Hardware.__dataclass_fields__} | {"total_gpus", "peak_bf16_tflops", "gpus"}


def hardware_from_dict(data: Mapping[str, Any], source: str = "hardware") -> Hardware:
    """Accept `detect --json` output or the flat form; unknown keys are an error naming them."""
    if not isinstance(data, Mapping):
        raise TuneLaunchError(f"{source}: expected a JSON object like {{\"nodes\": 1, \"gpus_per_node\": 8, \"gpu_memory_gib\": 80}}")
    unknown = sorted(set(data) - _FLAT_KEYS)
    if unknown:
        raise TuneLaunchError(f"{source}: unknown keys {unknown}; valid: {sorted(_FLAT_KEYS - {'total_gpus', 'peak_bf16_tflops'})}")
    values: dict[str, Any] = {}
    for key in Hardware.__dataclass_fields__:
        if key in data and data[key] is not None:
            values[key] = data[key]
    gpus = data.get("gpus")
    if gpus and "gpus_per_node" not in data:  # detect --json lists each GPU of this node
        values["gpus_per_node"] = len(gpus)
        values.setdefault("gpu_name", gpus[0].get("name"))
        values.setdefault("gpu_memory_gib", min(g.get("memory_gib", 0) for g in gpus))
        values.setdefault("bf16", all(g.get("bf16", False) for g in gpus))
        values.setdefault("compute_capability", gpus[0].get("compute_capability"))
    if isinstance(values.get("slurm"), Mapping):
        try:
            job = dict(values["slurm"])
            values["slurm"] = SlurmJob(**{**job, "nodes": tuple(job.get("nodes", ()))})
        except TypeError as e:
            raise TuneLaunchError(f"{source}: 'slurm' is not what `tune-launch detect --json` writes ({e})") from None
    for key, kind in (("nodes", int), ("gpus_per_node", int), ("cpu_cores", int)):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0):
            raise TuneLaunchError(f"{source}: '{key}' must be a non-negative integer, got {values[key]!r}")
    for key in ("gpu_memory_gib", "cpu_ram_gib"):
        if key in values and (not isinstance(values[key], (int, float)) or values[key] < 0):
            raise TuneLaunchError(f"{source}: '{key}' must be a non-negative number, got {values[key]!r}")
    if values.get("nodes", 1) < 1:
        raise TuneLaunchError(f"{source}: 'nodes' must be at least 1")
    if values.get("gpus_per_node", 0) > 0 and not values.get("gpu_memory_gib"):
        raise TuneLaunchError(f"{source}: 'gpu_memory_gib' is required when gpus_per_node > 0")
    values.setdefault("cpu_cores", 1)
    return Hardware(**values)


def load_hardware(path: str | os.PathLike[str]) -> Hardware:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise TuneLaunchError(f"--hardware {p}: no such file; write one with `tune-launch detect --json > {p.name}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TuneLaunchError(f"--hardware {p}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise TuneLaunchError(f"--hardware {p}: not valid JSON at line {e.lineno}: {e.msg}") from None
    return hardware_from_dict(data, f"--hardware {p}")


# --------------------------------------------------------------------------- probing this machine

def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "accelerate", "deepspeed", "transformers", "trl", "peft", "bitsandbytes", "datasets", "submitit"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cpu_ram_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / GIB
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def _no_gpu_device(env: Mapping[str, str]) -> bool:
    """True when no GPU can be there: hidden by CUDA_VISIBLE_DEVICES, or no NVIDIA/ROCm driver node and no
    nvidia-smi. Spares the ~1 s torch import on CPU machines; anything else is left to torch to decide."""
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    dev = Path("/dev")
    driver = Path("/proc/driver/nvidia").exists() or (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))
    return not driver and shutil.which("nvidia-smi", path=env.get("PATH")) is None


def _probe_gpus(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    if _no_gpu_device(os.environ if env is None else env):
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({
            "index": i,
            "name": props.name,
            "memory_gib": round(props.total_memory / GIB, 2),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": props.major >= 8,
        })
    return gpus


def _probe_peer_access(n: int) -> tuple[bool | None, bool | None]:
    if n < 2:
        return None, None
    import subprocess

    import torch

    peer = all(torch.cuda.can_device_access_peer(0, j) for j in range(1, n))
    nvlink = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=10).stdout
            nvlink = "NV" in out.split("Legend")[0]
        except (OSError, subprocess.SubprocessError):
            nvlink = None
    return peer, nvlink


def detect_hardware(output_dir: str | os.PathLike[str] = ".", env: Mapping[str, str] | None = None) -> Hardware:
    """Probe this node: GPUs, CPU, RAM, free disk where output goes, SLURM allocation, versions."""
    env = os.environ if env is None else env
    gpus = _probe_gpus(env)
    peer, nvlink = _probe_peer_access(len(gpus))
    slurm = SlurmJob.from_environ(env)
    target = Path(output_dir).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if slurm is not None and slurm.cpus_on_node:
        cores = min(cores, slurm.cpus_on_node)  # what SLURM gave this job on the node, not the whole machine
    return Hardware(
        nodes=slurm.num_nodes if slurm else 1,
        gpus_per_node=len(gpus),
        gpu_name=gpus[0]["name"] if gpus else None,
        gpu_memory_gib=min(g["memory_gib"] for g in gpus) if gpus else 0.0,
        compute_capability=gpus[0]["compute_capability"] if gpus else None,
        bf16=all(g["bf16"] for g in gpus) if gpus else False,
        peer_access=peer,
        nvlink=nvlink,
        cpu_cores=cores,
        cpu_ram_gib=round(_cpu_ram_gib(), 2),
        disk_free_gib=round(shutil.disk_usage(target).free / GIB, 2),
        slurm=slurm,
        liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
        versions=_versions(),
    )


def detect_json(hw: Hardware, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    data = hw.to_json()
    data["gpus"] = gpus if gpus is not None else _probe_gpus()
    return data


def describe(hw: Hardware) -> str:
    """Human-readable summary for `tune-launch detect`."""
    lines = []
    if hw.has_gpu:
        flops = peak_bf16_flops(hw.gpu_name)
        lines.append(
            f"GPUs      {hw.nodes} node(s) x {hw.gpus_per_node} x {hw.gpu_name} ({hw.gpu_memory_gib:.1f} GiB, "
            f"cc {hw.compute_capability or '?'}, bf16 {'yes' if hw.bf16 else 'no'}"
            + (f", {flops / 1e12:.0f} TFLOP/s bf16" if flops else ", peak FLOP/s unknown") + ")"
        )
        if hw.gpus_per_node > 1:
            lines.append(f"Links     peer access {_yn(hw.peer_access)}, NVLink {_yn(hw.nvlink)}")
    else:
        lines.append("GPUs      none (CPU only: tune-launch runs the cpu profile, or --cpu --num-processes N rehearsals)")
    lines.append(f"CPU       {hw.cpu_cores} cores, {hw.cpu_ram_gib:.1f} GiB RAM")
    if hw.disk_free_gib is not None:
        lines.append(f"Disk      {hw.disk_free_gib:.1f} GiB free where output goes")
    if hw.slurm:
        s = hw.slurm
        lines.append(f"SLURM     job {s.job_id}, {s.num_nodes} node(s) [{','.join(s.nodes)}], this node rank {s.node_rank}, "
                     f"restarts {s.restart_count}")
    else:
        lines.append("SLURM     not inside an allocation")
    lines.append("Versions  " + ", ".join(f"{k} {v}" for k, v in hw.versions.items()))
    return "\n".join(lines)


def _yn(v: bool | None) -> str:
    return "unknown" if v is None else ("yes" if v else "no")
