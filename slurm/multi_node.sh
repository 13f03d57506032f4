#!/bin/bash
# Train on several SLURM nodes: one tune-launch per node through srun; each starts one process per GPU.
#
#   sbatch slurm/multi_node.sh train.yaml [key.sub=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --partition=gpu --time=2-00:00:00 slurm/multi_node.sh train.yaml
#
# Options given to sbatch on the command line override the #SBATCH lines below. Submit from the directory
# that relative paths in the YAML (output_dir, data files) are relative to: every node starts there.
# Python: `tune-launch` on PATH at submission (activate the venv first; sbatch exports the environment),
# or TUNE_LAUNCH=/path/to/venv/bin/tune-launch. Nodes without GPUs run TUNE_LAUNCH_CPU_PROCESSES (default 1)
# gloo processes each: `sbatch --gpus-per-node=0 ...` on a CPU partition, e.g. the dev cluster (slurm/dev-cluster.sh).
#
# Rendezvous: node rank = SLURM_NODEID (never hostnames: they can repeat), main address = first host of the
# allocation, port = 20000 + (job id + 1000 x restarts) % 10000 (launch/slurm.py computes the same; a requeued
# run gets a new port, the old one lingers in TIME_WAIT).
# Preemption / time limit: USR1 reaches every process of the job 120 s before the limit (and on
# `scancel --signal=USR1 JOB`); every rank saves one atomic checkpoint, node 0 runs `scontrol requeue`, and
# the requeued job (same id, same command) resumes from that checkpoint. SIGTERM (preemption) does the same.
# Fewer or more nodes after a requeue (a --nodes range) or a resubmission: the checkpoint is resharded for the new
# world size, and gradient accumulation is recomputed so the global batch stays (train.global_batch_size, else the checkpoint's).
# Logs, per node, side by side in <output_dir>/logs/: slurm-<jobid>-node<N>.out (this node's tune-launch and its
# ranks) and node<N>.log (the training script's log); this script's own output: slurm-<job name>-<jobid>.out.
#
# ----------------------------------------------------------------- edit these lines for your cluster
#SBATCH --job-name=tune-launch
#SBATCH --nodes=2                 # nodes, or a range (2-4: as many as are free); world size = nodes x GPUs per node
##       no --ntasks-per-node:    it makes SLURM size a --nodes range by its minimum; srun below runs one tune-launch per node
#SBATCH --gpus-per-node=8         # GPUs per node (0 on CPU nodes)
#SBATCH --cpus-per-task=32        # CPU cores per node for data loading (OMP_NUM_THREADS = cores / GPUs)
#SBATCH --mem=0                   # all of each node's memory
#SBATCH --time=24:00:00           # wall-clock limit; the job requeues itself before it
#SBATCH --signal=USR1@120         # seconds before the limit to checkpoint (a save must fit in it)
#SBATCH --requeue                 # may be requeued (preemption, node failure, the signal above)
#SBATCH --open-mode=append        # a requeued run appends to the same log files
#SBATCH --output=slurm-%x-%j.out  # this script's output (relative to the submission directory)
##SBATCH --partition=gpu          # uncomment and set, or pass --partition=...
##SBATCH --account=my-account     # uncomment and set, or pass --account=...
# ----------------------------------------------------------------- nothing to edit below
set -euo pipefail

fail() { echo "tune-launch: error: $*" >&2; exit 2; }

(($# >= 1)) || fail "usage: sbatch slurm/multi_node.sh train.yaml [key.sub=value ...]"
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a SLURM job: submit with sbatch (or run slurm/dev-cluster.sh up to try it here)"
CONFIG=$1
shift
TUNE_LAUNCH=${TUNE_LAUNCH:-tune-launch}
command -v "$TUNE_LAUNCH" >/dev/null || fail "'$TUNE_LAUNCH' not found on $(hostname): activate the venv before sbatch, or pass TUNE_LAUNCH=/path/to/tune-launch"
[[ -f $CONFIG ]] || fail "$CONFIG: no such training YAML on node $SLURM_NODEID ($(hostname)), seen from $(pwd); submit from the directory it is relative to, or pass an absolute path on a shared filesystem"
CONFIG=$(realpath "$CONFIG")
# The interpreter of tune-launch knows where the YAML puts its output (and fails in one line on a bad YAML).
PYTHON=$(sed -n '1s/^#! *//p' "$(command -v "$TUNE_LAUNCH")")
[[ -x ${PYTHON%% *} && $PYTHON == *python* ]] || PYTHON=python3
OUTPUT_DIR=$("$PYTHON" -m tune_launch.launch.slurm output-dir "$CONFIG" "$@")
mkdir -p "$OUTPUT_DIR/logs"

MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PORT=$((20000 + (SLURM_JOB_ID + 1000 * ${SLURM_RESTART_COUNT:-0}) % 10000))
NUM_NODES=$SLURM_JOB_NUM_NODES
export TUNE_LAUNCH TUNE_LAUNCH_CPU_PROCESSES=${TUNE_LAUNCH_CPU_PROCESSES:-1}
echo "[slurm] $(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NUM_NODES node(s) $SLURM_JOB_NODELIST," \
     "main $MAIN_HOST:$MAIN_PORT, config $CONFIG $*, logs $OUTPUT_DIR/logs/slurm-$SLURM_JOB_ID-node<N>.out"

# One task per node; node rank and GPU count are read on each node from SLURM's own variables.
# --kill-on-bad-exit: a node that fails ends the others at once instead of leaving them in a collective.
set +e
srun --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
     --output="$OUTPUT_DIR/logs/slurm-%j-node%n.out" --open-mode=append \
  bash -c '
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then PROCS=$SLURM_GPUS_ON_NODE; DEVICES=(--gpus "$PROCS")
    else PROCS=$TUNE_LAUNCH_CPU_PROCESSES; DEVICES=(--cpu --num-processes "$PROCS"); fi
    # Threads per process from the cores SLURM gave this node, not from the machine (no oversubscription).
    CORES=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / PROCS > 0 ? CORES / PROCS : 1 ))}
    echo "[slurm] $(date +%T) node $SLURM_NODEID of $SLURM_JOB_NUM_NODES on $SLURMD_NODENAME (restart ${SLURM_RESTART_COUNT:-0})"
    # USR1 reaches every process of the job. Started with it ignored, accelerate/torchrun (which would die of it)
    # keep ignoring it; tune-launch and the training ranks install their own handlers.
    trap "" USR1
    exec "$TUNE_LAUNCH" "${DEVICES[@]}" --nodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" \
         --main-process-ip "$0" --main-process-port "$1" "${@:2}"
  ' "$MAIN_HOST" "$MAIN_PORT" "$CONFIG" "$@"
status=$?
echo "[slurm] $(date +%T) job $SLURM_JOB_ID: srun exited $status"
exit $status
