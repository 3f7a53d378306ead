#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head with 0 CPUs (it only schedules
# and hosts the dashboard/job server) plus N worker nodes with 1 CPU each, so that
# scheduling, spilling and node loss behave as on a real cluster.
#
#   cluster/local.sh start 2        # head + 2 one-CPU workers; prints the addresses
#   cluster/local.sh status         # nodes, resources, pids
#   cluster/local.sh add            # one more worker node (a node joining a running cluster)
#   cluster/local.sh kill I         # SIGKILL worker node I (a node lost: raylet, workers, store)
#   cluster/local.sh stop           # stops only the processes this script started
#
# then, from the repository root:
#   ray job submit --address http://127.0.0.1:8270 --working-dir . \
#     --runtime-env cluster/runtime_env.local.yaml -- \
#     python jobs/prune_book.py --data $PWD/runs/demo-data --out $PWD/runs/demo --budget 128
#
# Every node is a `ray start --block` process kept in the background; its pid is
# recorded, and `stop` signals exactly those pids (SIGTERM: `--block` then tears down
# the node's raylet, workers and agents; SIGKILL to the node's process group after a
# grace period). It never runs `ray stop`, which would kill every Ray process of the
# user on the machine (other clusters, other tests).
#
# Knobs (environment): DEALREC_RAY_PORT (GCS port, 6400), DEALREC_DASHBOARD_PORT (8270),
# DEALREC_LOCAL_CLUSTER_DIR (pid/log folder, runs/local-cluster),
# DEALREC_RAY_TEMP_DIR (Ray's temp dir, /tmp/dealrec-ray-<port>; keep it short:
# unix socket paths are limited to 107 bytes), DEALREC_OBJECT_STORE_BYTES (per node,
# 200 MB), DEALREC_WORKER_CPUS (CPUs per worker node, 1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -x "$ROOT/.venv/bin/ray" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
# Token auth turns itself on once ~/.ray/auth_token exists
# (docs/architecture.md#the-stack-checked-versions-and-traps); a local cluster
# started by scripts and tests runs without it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Workers import the project's packages (engine, actors, jobs) without an install.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PORT=${DEALREC_RAY_PORT:-6400}
DASH=${DEALREC_DASHBOARD_PORT:-8270}
STATE=${DEALREC_LOCAL_CLUSTER_DIR:-$ROOT/runs/local-cluster}
TEMP=${DEALREC_RAY_TEMP_DIR:-/tmp/dealrec-ray-$PORT}
OBJ=${DEALREC_OBJECT_STORE_BYTES:-200000000}
WCPUS=${DEALREC_WORKER_CPUS:-1}
GRACE=${DEALREC_STOP_GRACE_S:-20}

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Ports a node binds besides the random ones Ray picks itself: fixed defaults such as
# the dashboard agent's 52365 would collide between nodes on one machine.
node_ports() {
  local i=$1 b=$((PORT + 20 + 10 * $1))
  echo "--dashboard-agent-listen-port $b --dashboard-agent-grpc-port $((b + 1))" \
       "--runtime-env-agent-port $((b + 2)) --metrics-export-port $((b + 3))"
}

start_node() {  # name, then the `ray start` arguments
  local name=$1
  shift
  # setsid: the node gets its own process group, so `stop` can reach stragglers by
  # that group's id without touching anything else.
  setsid ray start --block --disable-usage-stats --temp-dir "$TEMP" \
    --object-store-memory "$OBJ" "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

n_alive_nodes() {
  # `ray status` lists one "1 node_<id>" line per alive node under "Active:"
  ray status --address "127.0.0.1:$PORT" 2>/dev/null | grep -cE '^ +1 node_' || true
}

wait_for() {  # seconds, description, command...
  local t=$1 what=$2
  shift 2
  for _ in $(seq "$t"); do
    if "$@"; then return 0; fi
    sleep 1
  done
  echo "local.sh: timed out after ${t}s waiting for $what; see $STATE/*.log" >&2
  return 1
}

head_up() { ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1; }
dash_up() { python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$DASH/api/version', timeout=2)" 2>/dev/null; }
nodes_up() { [ "$(n_alive_nodes)" -ge "$1" ]; }

cmd_start() {
  local n=${1:-2}
  case $n in ''|*[!0-9]*) echo "local.sh: N must be a whole number of worker nodes, got '$n'" >&2; exit 2;; esac
  mkdir -p "$STATE"
  if alive "$(cat "$STATE/head.pid" 2>/dev/null)"; then
    echo "local.sh: a cluster is already running from $STATE (head pid $(cat "$STATE/head.pid")); run 'cluster/local.sh stop' first" >&2
    exit 1
  fi
  rm -f "$STATE"/*.pid "$STATE"/*.killed "$STATE"/*.log
  local t0=$SECONDS
  # shellcheck disable=SC2046  # node_ports is meant to split into words
  start_node head --head --port "$PORT" --num-cpus 0 --num-gpus 0 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --ray-client-server-port $((PORT + 1)) $(node_ports 0)
  wait_for 60 "the head node" head_up
  local i
  for i in $(seq 1 "$n"); do
    # One node at a time: nodes started together on one machine race for the same
    # log-file names and random ports ("bind: Address already in use" in a raylet).
    # shellcheck disable=SC2046
    start_node "worker$i" --address "127.0.0.1:$PORT" --num-cpus "$WCPUS" --num-gpus 0 $(node_ports "$i")
    wait_for 90 "worker node $i" nodes_up $((i + 1))
  done
  wait_for 60 "the dashboard / job server" dash_up
  echo "local Ray cluster up in $((SECONDS - t0))s: head (0 CPUs) + $n worker node(s) x $WCPUS CPU"
  echo "  GCS address:        127.0.0.1:$PORT   (ray.init(address=...))"
  echo "  dashboard / jobs:   http://127.0.0.1:$DASH"
  echo "  export RAY_ADDRESS=http://127.0.0.1:$DASH RAY_AUTH_MODE=disabled"
  echo "  ray job submit --working-dir . --runtime-env cluster/runtime_env.local.yaml -- python jobs/prune_book.py --data ... --out ..."
}

cmd_add() {
  alive "$(cat "$STATE/head.pid" 2>/dev/null)" || { echo "local.sh: no cluster running from $STATE" >&2; exit 1; }
  local i=1
  while [ -e "$STATE/worker$i.pid" ]; do i=$((i + 1)); done
  local before
  before=$(n_alive_nodes)
  # shellcheck disable=SC2046
  start_node "worker$i" --address "127.0.0.1:$PORT" --num-cpus "$WCPUS" --num-gpus 0 $(node_ports "$i")
  wait_for 90 "worker node $i" nodes_up $((before + 1))
  echo "worker node $i joined (pid $(cat "$STATE/worker$i.pid"))"
}

cmd_kill() {
  local i=${1:-}
  case $i in ''|*[!0-9]*) echo "local.sh: kill needs a worker number, got '$i'" >&2; exit 2;; esac
  local f="$STATE/worker$i.pid"
  [ -e "$f" ] || { echo "local.sh: no worker node $i in $STATE" >&2; exit 1; }
  # the whole process group at once, as a machine that dies: no clean shutdown
  kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
  mv "$f" "$STATE/worker$i.killed"
  echo "worker node $i SIGKILLed"
}

cmd_stop() {
  local f pid pids=()
  shopt -s nullglob
  # workers first: a head that goes first makes the workers log reconnect errors
  for f in "$STATE"/worker*.pid "$STATE"/head.pid; do
    pid=$(cat "$f")
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq "$GRACE"); do
    local left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ $left = 0 ] && break
    sleep 1
  done
  for f in "$STATE"/worker*.pid "$STATE"/head.pid; do
    pid=$(cat "$f")
    # the node's own process group (setsid above): raylet, workers, agents left behind
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
  echo "local Ray cluster stopped (${#pids[@]} node process(es) from $STATE)"
}

cmd_status() {
  local f pid n=0
  shopt -s nullglob
  for f in "$STATE"/head.pid "$STATE"/worker*.pid; do
    pid=$(cat "$f")
    if alive "$pid"; then echo "$(basename "$f" .pid): pid $pid running"; n=$((n + 1));
    else echo "$(basename "$f" .pid): pid $pid not running"; fi
  done
  if [ $n = 0 ]; then
    echo "no local cluster running from $STATE"
    return 1
  fi
  ray status --address "127.0.0.1:$PORT" || true
  echo "dashboard / jobs: http://127.0.0.1:$DASH"
}

case ${1:-} in
  start) cmd_start "${2:-2}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  add) cmd_add ;;
  kill) cmd_kill "${2:-}" ;;
  *) usage ;;
esac
