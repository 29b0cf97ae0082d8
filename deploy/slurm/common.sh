# shellcheck shell=bash
# Sourced by the sbatch scripts of deploy/slurm: where the scheduler file and settings live.
# Submit from the repository root (or set DASK_CONFIG / EMPHY_SCHEDULER_FILE yourself): Slurm
# runs a copy of each script from its spool folder, so paths are taken from the submit folder.
# The scheduler file must be on a filesystem that every node sees (home or a shared scratch).
set -euo pipefail
export DASK_CONFIG="${DASK_CONFIG:-${SLURM_SUBMIT_DIR:-$PWD}/deploy/dask.yaml}"
export EMPHY_SCHEDULER_FILE="${EMPHY_SCHEDULER_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.emphy-slurm/scheduler.json}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$(dirname "$EMPHY_SCHEDULER_FILE")"
[ -f "$DASK_CONFIG" ] || { echo "emphy slurm: $DASK_CONFIG not found: submit from the repository root or set DASK_CONFIG" >&2; exit 1; }

cfg() { "$PYTHON" -c "import dask.config as c, sys; print(c.get(sys.argv[1]))" "$1"; }

wait_for_scheduler_file() {   # up to $1 seconds
    local waited=0
    until [ -s "$EMPHY_SCHEDULER_FILE" ]; do
        [ "$waited" -lt "$1" ] || { echo "emphy slurm: no scheduler file $EMPHY_SCHEDULER_FILE after $1 s" >&2; exit 1; }
        sleep 2; waited=$((waited + 2))
    done
}
