#!/bin/bash
# Train on one SLURM node: tune-launch starts one process per GPU of the allocation.
#
#   sbatch slurm/single_node.sh train.yaml [key.sub=value ...]
#   sbatch --gpus-per-node=4 --partition=gpu --time=8:00:00 slurm/single_node.sh train.yaml
#
# Options given to sbatch on the command line override the #SBATCH lines below. Submit from the directory
# that relative paths in the YAML are relative to. Python: `tune-launch` on PATH at submission (activate the
# venv first), or TUNE_LAUNCH=/path/to/venv/bin/tune-launch. Without GPUs (--gpus-per-node=0) it runs
# TUNE_LAUNCH_CPU_PROCESSES (default 1) gloo processes.
# Time limit / preemption: USR1 120 s before the limit (or `scancel --signal=USR1 JOB`) -> one atomic checkpoint,
# `scontrol requeue`, and the requeued job resumes from it. More nodes: slurm/multi_node.sh.
# Logs side by side in <output_dir>/logs/: slurm-<jobid>-node0.out and node0.log; this script's: slurm-<name>-<jobid>.out.
#
# ----------------------------------------------------------------- edit these lines for your cluster
#SBATCH --job-name=tune-launch
#SBATCH --nodes=1                 # one node (slurm/multi_node.sh for more)
#SBATCH --ntasks-per-node=1       # one tune-launch (it starts the per-GPU processes itself): keep 1
#SBATCH --gpus-per-node=8         # GPUs (0 for a CPU run)
#SBATCH --cpus-per-task=32        # CPU cores for data loading (OMP_NUM_THREADS = cores / GPUs)
#SBATCH --mem=0                   # all of the node's memory
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

(($# >= 1)) || fail "usage: sbatch slurm/single_node.sh train.yaml [key.sub=value ...]"
[[ -n ${SLURM_JOB_ID:-} ]] || fail "not inside a SLURM job: submit with sbatch (or run slurm/dev-cluster.sh up to try it here)"
((${SLURM_JOB_NUM_NODES:-1} == 1)) || fail "single_node.sh got $SLURM_JOB_NUM_NODES nodes: use slurm/multi_node.sh for more than one"
CONFIG=$1
shift
TUNE_LAUNCH=${TUNE_LAUNCH:-tune-launch}
command -v "$TUNE_LAUNCH" >/dev/null || fail "'$TUNE_LAUNCH' not found on $(hostname): activate the venv before sbatch, or pass TUNE_LAUNCH=/path/to/tune-launch"
[[ -f $CONFIG ]] || fail "$CONFIG: no such training YAML on $(hostname), seen from $(pwd); submit from the directory it is relative to, or pass an absolute path"
CONFIG=$(realpath "$CONFIG")
PYTHON=$(sed -n '1s/^#! *//p' "$(command -v "$TUNE_LAUNCH")")
[[ -x ${PYTHON%% *} && $PYTHON == *python* ]] || PYTHON=python3
OUTPUT_DIR=$("$PYTHON" -m tune_launch.launch.slurm output-dir "$CONFIG" "$@")
mkdir -p "$OUTPUT_DIR/logs"
export TUNE_LAUNCH TUNE_LAUNCH_CPU_PROCESSES=${TUNE_LAUNCH_CPU_PROCESSES:-1}
echo "[slurm] $(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
     "config $CONFIG $*, logs $OUTPUT_DIR/logs/slurm-$SLURM_JOB_ID-node0.out"

set +e
srun --nodes=1 --ntasks=1 --output="$OUTPUT_DIR/logs/slurm-%j-node%n.out" --open-mode=append \
  bash -c '
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then PROCS=$SLURM_GPUS_ON_NODE; DEVICES=(--gpus "$PROCS")
    else PROCS=$TUNE_LAUNCH_CPU_PROCESSES; DEVICES=(--cpu --num-processes "$PROCS"); fi
    CORES=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / PROCS > 0 ? CORES / PROCS : 1 ))}
    echo "[slurm] $(date +%T) node $SLURM_NODEID on $SLURMD_NODENAME (restart ${SLURM_RESTART_COUNT:-0})"
    trap "" USR1  # see multi_node.sh: accelerate/torchrun must not die of the checkpoint signal
    exec "$TUNE_LAUNCH" "${DEVICES[@]}" "$@"
  ' bash "$CONFIG" "$@"
status=$?
echo "[slurm] $(date +%T) job $SLURM_JOB_ID: srun exited $status"
exit $status
