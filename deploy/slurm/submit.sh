#!/usr/bin/env bash
# Submit a whole emphy-dask run to Slurm: the scheduler, CPU workers, GPU workers (optional)
# and the job, which cancels the cluster when it is done. Run from the repository root.
#
#   deploy/slurm/submit.sh INPUT OUT [--job jobs/NAME.toml] [--cpu-tasks N] [--gpu-tasks M]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 INPUT OUT [--job FILE] [--cpu-tasks N] [--gpu-tasks M]" >&2; exit 2; }
export EMPHY_INPUT EMPHY_OUT EMPHY_JOB_FILE="" EMPHY_CLUSTER_JOBS
EMPHY_INPUT="$(realpath "$1")"
EMPHY_OUT="$(realpath -m "$2")"
shift 2
cpu_tasks=8
gpu_tasks=0
while [ $# -gt 0 ]; do
    case "$1" in
        --job) EMPHY_JOB_FILE="$(realpath "$2")"; shift 2 ;;
        --cpu-tasks) cpu_tasks="$2"; shift 2 ;;
        --gpu-tasks) gpu_tasks="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
here="deploy/slurm"
sched="$(sbatch --parsable "$here/scheduler.sbatch")"
jobs="$sched"
if [ "$cpu_tasks" -gt 0 ]; then
    jobs="$jobs $(sbatch --parsable --dependency="after:$sched" --ntasks="$cpu_tasks" "$here/cpu-workers.sbatch")"
fi
if [ "$gpu_tasks" -gt 0 ]; then
    jobs="$jobs $(sbatch --parsable --dependency="after:$sched" --ntasks="$gpu_tasks" "$here/gpu-workers.sbatch")"
fi
EMPHY_CLUSTER_JOBS="$jobs"
job="$(sbatch --parsable --dependency="after:$sched" --export=ALL "$here/job.sbatch")"
echo "scheduler $sched, cluster jobs: $jobs; the job: $job (log emphy-extract-$job.log)"
