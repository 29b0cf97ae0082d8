#!/usr/bin/env bash
# Start / stop a Dask cluster for emphy-dask on this machine: one scheduler, CPU workers
# (--resources CPU=1, one thread each) and, when NVIDIA GPUs are visible, dask-cuda GPU workers
# (--resources GPU=1, one per GPU). Settings come from deploy/dask.yaml (DASK_CONFIG).
#
#   deploy/local/emphy-cluster.sh start [--cpu-workers N] [--gpu-workers auto|0|N] [--host ADDR]
#                                       [--port P] [--dashboard ADDR] [--memory-limit SIZE]
#                                       [--run-dir DIR]
#   emphy extract INPUT -o OUT --scheduler DIR/scheduler.json      # the job joins it
#   deploy/local/emphy-cluster.sh status [--run-dir DIR]
#   deploy/local/emphy-cluster.sh stop [--run-dir DIR]
#
# The scheduler and the dashboard listen on 127.0.0.1 unless told otherwise (--host 0.0.0.0 to
# accept workers from other machines; --dashboard 0.0.0.0:8787 to show the dashboard to them).
# Each process group's id, its log and the scheduler file live in the run folder
# (default ./.emphy-cluster); `stop` ends exactly those process groups and nothing else.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DASK_CONFIG="${DASK_CONFIG:-$HERE/../dask.yaml}"
PYTHON="${PYTHON:-python3}"

die() { echo "emphy-cluster: $*" >&2; exit 1; }
cfg() { "$PYTHON" -c "import dask.config as c, sys; print(c.get(sys.argv[1]))" "$1"; }

cmd="${1:-}"
[ -n "$cmd" ] || die "usage: $0 start|stop|status [options] (see the header of this script)"
shift
RUN_DIR="${EMPHY_RUN_DIR:-$PWD/.emphy-cluster}"
HOST="127.0.0.1"
PORT=""
DASHBOARD="${EMPHY_DASHBOARD_ADDRESS:-}"
CPU_WORKERS=""
GPU_WORKERS="auto"
MEMORY_LIMIT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-workers) CPU_WORKERS="$2"; shift 2 ;;
        --gpu-workers) GPU_WORKERS="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --dashboard) DASHBOARD="$2"; shift 2 ;;
        --memory-limit) MEMORY_LIMIT="$2"; shift 2 ;;
        --run-dir) RUN_DIR="$2"; shift 2 ;;
        *) die "unknown option $1" ;;
    esac
done
SCHEDULER_FILE="$RUN_DIR/scheduler.json"

# Start "$@" as the leader of a new session (so its whole process tree is one process group),
# logging to $RUN_DIR/logs/$name.log; its pid (= the group id) goes to $RUN_DIR/$name.pid.
spawn() {
    local name="$1"; shift
    "$PYTHON" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
        >>"$RUN_DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
}

alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_group() {   # TERM the group, wait up to 30 s, then KILL what is left
    local pidfile="$1" pgid
    pgid="$(cat "$pidfile")"
    if alive "$pgid"; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
        for _ in $(seq 1 60); do alive "$pgid" || break; sleep 0.5; done
        if alive "$pgid"; then
            echo "emphy-cluster: $(basename "$pidfile" .pid) did not stop in 30 s, killing it" >&2
            kill -KILL -- "-$pgid" 2>/dev/null || true
            for _ in $(seq 1 20); do alive "$pgid" || break; sleep 0.25; done
        fi
    fi
    rm -f "$pidfile"
}

do_stop() {
    local found=0 f
    for f in "$RUN_DIR"/gpu-workers.pid "$RUN_DIR"/cpu-workers.pid "$RUN_DIR"/scheduler.pid; do
        [ -f "$f" ] || continue
        found=1
        stop_group "$f"
    done
    rm -f "$SCHEDULER_FILE"
    if [ "$found" = 1 ]; then echo "emphy-cluster: stopped ($RUN_DIR)"; else echo "emphy-cluster: nothing running in $RUN_DIR"; fi
}

count_gpus() {
    "$PYTHON" -c "
try:
    from dask_cuda.utils import get_n_gpus
    print(int(get_n_gpus()))
except Exception:
    print(0)"
}

wait_for_workers() {   # $1 = how many, $2 = timeout s
    "$PYTHON" - "$SCHEDULER_FILE" "$1" "$2" <<'EOF'
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="60s") as c:
    if int(sys.argv[2]) > 0:
        c.wait_for_workers(int(sys.argv[2]), timeout=float(sys.argv[3]))
    info = c.scheduler_info(n_workers=-1)
    print(f"emphy-cluster: {info['address']}, {len(info['workers'])} workers")
EOF
}

do_start() {
    if [ -f "$RUN_DIR/scheduler.pid" ] && alive "$(cat "$RUN_DIR/scheduler.pid")"; then
        die "already running in $RUN_DIR (stop it first: $0 stop --run-dir $RUN_DIR)"
    fi
    mkdir -p "$RUN_DIR/logs"
    rm -f "$SCHEDULER_FILE"
    PORT="${PORT:-$(cfg emphy.deploy.scheduler-port)}"
    DASHBOARD="${DASHBOARD:-$(cfg emphy.deploy.dashboard-address)}"
    CPU_WORKERS="${CPU_WORKERS:-$(getconf _NPROCESSORS_ONLN)}"
    MEMORY_LIMIT="${MEMORY_LIMIT:-$(cfg emphy.deploy.cpu-worker.memory-limit)}"
    local n_gpu
    if [ "$GPU_WORKERS" = auto ]; then n_gpu="$(count_gpus)"; else n_gpu="$GPU_WORKERS"; fi

    spawn scheduler "$PYTHON" -m dask scheduler --host "$HOST" --port "$PORT" \
        --dashboard-address "$DASHBOARD" --scheduler-file "$SCHEDULER_FILE"
    for _ in $(seq 1 120); do [ -s "$SCHEDULER_FILE" ] && break; sleep 0.5; done
    if [ ! -s "$SCHEDULER_FILE" ]; then
        tail -n 20 "$RUN_DIR/logs/scheduler.log" >&2 || true
        do_stop >/dev/null
        die "the scheduler did not start within 60 s (log above: $RUN_DIR/logs/scheduler.log)"
    fi
    if [ "$CPU_WORKERS" -gt 0 ]; then
        spawn cpu-workers "$PYTHON" -m dask worker --scheduler-file "$SCHEDULER_FILE" \
            --nworkers "$CPU_WORKERS" --nthreads "$(cfg emphy.deploy.cpu-worker.nthreads)" \
            --resources "$(cfg emphy.deploy.cpu-worker.resources)" --memory-limit "$MEMORY_LIMIT" \
            --host "$HOST" --name cpu --no-dashboard
    fi
    if [ "$n_gpu" -gt 0 ]; then
        spawn gpu-workers "$PYTHON" -m dask cuda worker --scheduler-file "$SCHEDULER_FILE" \
            --nthreads "$(cfg emphy.deploy.gpu-worker.nthreads)" \
            --resources "$(cfg emphy.deploy.gpu-worker.resources)" \
            --memory-limit "$(cfg emphy.deploy.gpu-worker.memory-limit)" \
            --host "$HOST" --name gpu --no-dashboard
    fi
    if ! wait_for_workers "$((CPU_WORKERS + n_gpu))" 180; then
        tail -n 20 "$RUN_DIR"/logs/*workers.log >&2 || true
        do_stop >/dev/null
        die "workers did not join within 180 s (logs in $RUN_DIR/logs)"
    fi
    echo "emphy-cluster: $CPU_WORKERS CPU workers (CPU=1), $n_gpu GPU workers (GPU=1)"
    echo "emphy-cluster: dashboard http://$DASHBOARD/status"
    echo "emphy-cluster: run jobs with  emphy extract INPUT -o OUT --scheduler $SCHEDULER_FILE"
    echo "emphy-cluster: stop with      $0 stop --run-dir $RUN_DIR"
}

do_status() {
    if [ -f "$RUN_DIR/scheduler.pid" ] && alive "$(cat "$RUN_DIR/scheduler.pid")"; then
        wait_for_workers 0 10
    else
        echo "emphy-cluster: not running ($RUN_DIR)"
        return 1
    fi
}

case "$cmd" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) die "unknown command $cmd (start, stop, status)" ;;
esac
