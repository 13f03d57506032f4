"""SLURM facts as pure functions: node lists, the job's environment, the rendezvous port, per-node launch argv.

Everything here takes its inputs as arguments (the environment as a mapping), so it is tested without a
cluster; `launch/submit.py` and `slurm/*.sh` are the thin layers that act. Node rank always comes from
SLURM_NODEID: hostnames can repeat (two slurmd on one machine, containers), so ranks are never derived
from them.

    python -m tune_launch.launch.slurm output-dir train.yaml [key.sub=value ...]   where the job's logs go (slurm/*.sh)
    python -m tune_launch.launch.slurm port JOB_ID [RESTARTS]                                the rendezvous port of a job
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tune_launch.errors import TuneLaunchError

PORT_BASE = 20000  # below Linux's ephemeral range (32768+), away from accelerate's 29500 default
PORT_SPAN = 10000
RESTART_STRIDE = 1000
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


# --------------------------------------------------------------------------- node lists

def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'n[1-2],gpu[01,03]' -> ['n[1-2]', 'gpu[01,03]']."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"node list {text!r}: '[' without ']'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, source: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding kept, as SLURM does)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            out.append(item)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if not m:
            raise ValueError(f"node list {source!r}: cannot read range {item!r}")
        lo, hi = m.groups()
        if int(hi) < int(lo):
            raise ValueError(f"node list {source!r}: range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as hostnames, in order (what `scontrol show hostnames` prints).

    'n[1-2],gpu[01-03]' -> ['n1', 'n2', 'gpu01', 'gpu02', 'gpu03']; 'rack[1-2]-n[1,3]' -> rack1-n1, rack1-n3, ...
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        pieces = _BRACKET.split(part)  # literal, range, literal, range, ..., literal
        if "[" in "".join(pieces[0::2]) or "]" in "".join(pieces[0::2]):
            raise ValueError(f"node list {nodelist!r}: nested or unbalanced brackets in {part!r}")
        choices = [[p] if i % 2 == 0 else _expand_range(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def port_from_job_id(job_id: str | int, restart_count: int = 0) -> int:
    """The rendezvous port every node of a job computes alike: PORT_BASE + (job id + 1000 x restarts) mod PORT_SPAN.

    A requeued job keeps its id but not its port: the previous run's connections to the old port linger in
    TIME_WAIT for a minute. slurm/*.sh compute the same in bash.
    """
    digits = re.match(r"\d+", str(job_id).strip())
    if not digits:
        raise TuneLaunchError(f"SLURM job id {job_id!r}: expected a number (SLURM_JOB_ID)")
    return PORT_BASE + (int(digits.group(0)) + RESTART_STRIDE * max(restart_count, 0)) % PORT_SPAN


# --------------------------------------------------------------------------- the job's environment

def _count(raw: str | None) -> int | None:
    """SLURM counts look like '8', '2(x3)' or '4,4': the first number, or None."""
    if raw is None:
        return None
    m = re.match(r"\s*(\d+)", raw)
    return int(m.group(1)) if m else None


def _gpus_on_node(env: Mapping[str, str]) -> int:
    """SLURM_GPUS_ON_NODE when set, else the length of the job's GPU index list, else 0."""
    n = _count(env.get("SLURM_GPUS_ON_NODE"))
    if n is not None:
        return n
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        ids = [x for x in env.get(name, "").split(",") if x.strip()]
        if ids:
            return len(ids)
    return 0


@dataclass(frozen=True)
class SlurmJob:
    """The allocation this process runs in, read once from SLURM's environment."""

    job_id: str
    num_nodes: int
    node_rank: int  # SLURM_NODEID: 0..num_nodes-1, the same on every task of a node
    nodes: tuple[str, ...]
    gpus_on_node: int = 0
    cpus_on_node: int | None = None
    cpus_per_task: int | None = None
    restart_count: int = 0
    partition: str | None = None
    submit_dir: str | None = None

    @property
    def main_host(self) -> str:
        """The first host of the allocation: node rank 0 runs there and hosts the rendezvous."""
        return self.nodes[0]

    @property
    def main_port(self) -> int:
        return port_from_job_id(self.job_id, self.restart_count)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> SlurmJob | None:
        """None outside SLURM; a TuneLaunchError naming the variables when they disagree."""
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            return None
        raw_list = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            nodes = tuple(expand_nodelist(raw_list))
        except ValueError as e:
            raise TuneLaunchError(f"SLURM_JOB_NODELIST: {e}") from None
        num_nodes = _count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or len(nodes) or 1
        node_rank = _count(env.get("SLURM_NODEID"))
        if node_rank is None:
            node_rank = 0
        if not nodes:
            raise TuneLaunchError(f"SLURM job {job_id}: SLURM_JOB_NODELIST is empty; run inside an allocation (sbatch/srun)")
        if len(nodes) != num_nodes:
            raise TuneLaunchError(f"SLURM job {job_id}: SLURM_JOB_NUM_NODES={num_nodes} but SLURM_JOB_NODELIST={raw_list!r} "
                                  f"names {len(nodes)} host(s)")
        if not 0 <= node_rank < num_nodes:
            raise TuneLaunchError(f"SLURM job {job_id}: SLURM_NODEID={node_rank} is outside 0..{num_nodes - 1}")
        return cls(
            job_id=job_id, num_nodes=num_nodes, node_rank=node_rank, nodes=nodes, gpus_on_node=_gpus_on_node(env),
            cpus_on_node=_count(env.get("SLURM_CPUS_ON_NODE")), cpus_per_task=_count(env.get("SLURM_CPUS_PER_TASK")),
            restart_count=_count(env.get("SLURM_RESTART_COUNT")) or 0,
            partition=env.get("SLURM_JOB_PARTITION") or None, submit_dir=env.get("SLURM_SUBMIT_DIR") or None,
        )


# --------------------------------------------------------------------------- what each node runs

@dataclass(frozen=True)
class NodeLaunch:
    """What one tune-launch per node is told: the same on every node except the node rank."""

    config: str
    overrides: tuple[str, ...] = ()
    profile: str = "auto"
    cpu_processes: int = 1  # processes per node on CPU nodes (no GPU in the allocation)
    gpus_per_node: int = 0  # outside SLURM only (submit --local); inside, SLURM_GPUS_ON_NODE decides


def node_argv(launch: NodeLaunch, job: SlurmJob, tune_launch: Sequence[str] = ("tune-launch",)) -> list[str]:
    """`tune-launch ... --nodes N --node-rank R --main-process-ip HOST0 --main-process-port P config overrides`.

    GPU nodes run one process per GPU SLURM gave this node; CPU nodes run `--cpu --num-processes K` (gloo).
    """
    argv = list(tune_launch)
    if launch.profile != "auto":
        argv += ["--profile", launch.profile]
    if job.gpus_on_node > 0:
        argv += ["--gpus", str(job.gpus_on_node)]
    else:
        argv += ["--cpu", "--num-processes", str(launch.cpu_processes)]
    argv += ["--nodes", str(job.num_nodes), "--node-rank", str(job.node_rank),
             "--main-process-ip", job.main_host, "--main-process-port", str(job.main_port),
             launch.config, *launch.overrides]
    return argv


def omp_threads(cores: int | None, processes: int) -> int:
    """Threads per process from the cores SLURM gave this node (never the machine's: no oversubscription)."""
    return max(1, (cores or 1) // max(processes, 1))


# --------------------------------------------------------------------------- submission (tune-launch submit)

_TIME = re.compile(r"^(?:(\d+)-)?(\d+(?::\d+){0,2})$")


def parse_time_minutes(text: str) -> int:
    """sbatch --time forms as whole minutes (seconds round up): M, M:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise TuneLaunchError(f"--time {text!r}: use minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)")
    days, rest = m.groups()
    parts = [int(x) for x in rest.split(":")]
    if days is None:
        h, mi, sec = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) == 2 else 0)
    else:
        h, mi, sec = (parts + [0, 0])[:3]
    minutes = int(days or 0) * 1440 + h * 60 + mi + (1 if sec else 0)
    if minutes < 1:
        raise TuneLaunchError(f"--time {text!r}: must be at least one minute")
    return minutes


@dataclass(frozen=True)
class SubmitSpec:
    """A `tune-launch submit` request, validated: what the sbatch script and each node's task are made of."""

    launch: NodeLaunch
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    job_name: str = "tune-launch"
    signal_delay_s: int = 120
    extra: tuple[tuple[str, str], ...] = ()  # further sbatch options, e.g. (("qos", "high"),)
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("nodes", "time_min"):
            if getattr(self, name) < 1:
                raise TuneLaunchError(f"--{name.replace('_min', '').replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.gpus_per_node < 0:
            raise TuneLaunchError(f"--gpus-per-node {self.gpus_per_node}: must be 0 (CPU nodes) or more")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise TuneLaunchError(f"--cpus-per-task {self.cpus_per_task}: must be at least 1")
        if not 0 < self.signal_delay_s < self.time_min * 60:
            raise TuneLaunchError(f"--signal-delay {self.signal_delay_s}: must be between 1 s and the time limit "
                                  f"({self.time_min * 60} s); the checkpoint must fit in it")


# The checkpoint signal: submitit's own default (USR2) would kill accelerate/torchrun and the ranks, which get it
# too (SLURM signals every process of a step). USR1 is what tune-launch and the training script handle.
PREEMPT_SIGNAL = "USR1"


def parse_sbatch_options(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """['qos=high', 'constraint=a100', 'exclusive'] -> (('qos', 'high'), ...); a bare flag gets value ''."""
    out = []
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
            raise TuneLaunchError(f"--sbatch {item!r}: expected an sbatch option as key=value, e.g. --sbatch qos=high")
        out.append((key.replace("_", "-"), value))
    return tuple(out)


def sbatch_parameters(spec: SubmitSpec) -> dict:
    """submitit's SlurmExecutor parameters (its `_make_sbatch_string` keywords) for a submission."""
    params: dict = {
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "ntasks_per_node": 1,  # one tune-launch per node; it starts the per-GPU processes itself
        "time": spec.time_min,
        "signal_delay_s": spec.signal_delay_s,
        "stderr_to_stdout": False,
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *spec.setup],
        "additional_parameters": {"requeue": True, "signal": f"{PREEMPT_SIGNAL}@{spec.signal_delay_s}",
                                  **{k: (v if v != "" else True) for k, v in spec.extra}},
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    if spec.cpus_per_task:
        params["cpus_per_task"] = spec.cpus_per_task
    if spec.partition:
        params["partition"] = spec.partition
    if spec.account:
        params["account"] = spec.account
    return params


def partition_sizes(sinfo: str) -> tuple[dict[str, int], str | None]:
    """`sinfo -h -o '%P %D'` -> ({partition: nodes}, default partition); a partition's rows are summed."""
    sizes: dict[str, int] = {}
    default = None
    for line in sinfo.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        name = parts[0]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        sizes[name] = sizes.get(name, 0) + int(parts[1])
    return sizes, default


def check_partition(spec: SubmitSpec, sizes: Mapping[str, int], default: str | None) -> None:
    """A job asking for more nodes than its partition has would pend forever: refuse it before sbatch."""
    name = spec.partition or default
    if name is None:
        return
    if name not in sizes:
        raise TuneLaunchError(f"--partition {name}: no such partition here; partitions: {', '.join(sorted(sizes)) or 'none'}")
    if spec.nodes > sizes[name]:
        raise TuneLaunchError(f"--nodes {spec.nodes}: partition {name} has {sizes[name]} node(s); "
                              f"ask for at most {sizes[name]}, or pick a larger --partition")


# --------------------------------------------------------------------------- helpers for slurm/*.sh

def output_dir_of(config: str, overrides: Sequence[str]) -> str:
    """The YAML's output_dir (after overrides), without touching the model or data files."""
    from tune_launch.training.config import load_config

    return str(load_config(config, list(overrides), check_files=False).output_dir)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) >= 2 and args[0] == "output-dir":
            print(output_dir_of(args[1], args[2:]))
            return 0
        if len(args) in (2, 3) and args[0] == "port":
            print(port_from_job_id(args[1], int(args[2]) if len(args) == 3 and args[2].isdigit() else 0))
            return 0
    except TuneLaunchError as e:
        print(f"tune-launch: error: {e}", file=sys.stderr)
        return 2
    print("usage: python -m tune_launch.launch.slurm output-dir train.yaml [key.sub=value ...] | port JOB_ID [RESTARTS]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
