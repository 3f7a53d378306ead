#!/usr/bin/env bash
# `make demo`: embedded synthetic data -> a local Ray cluster (started and stopped here)
# -> `ray job submit -- python jobs/prune_book.py` -> prints where the report is.
# --overwrite: a checkout upgraded since the last demo recomputes the stages whose config changed
# (instead of refusing them); an unchanged config still resumes and skips every finished stage.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$ROOT/.venv/bin:$PATH" RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
DATA=${DEMO_DATA:-$ROOT/runs/demo-data}
OUT=${DEMO_OUT:-$ROOT/runs/demo}
# Every port this head listens on is a free one unless given: a Ray cluster already running on the
# machine (another demo, a `ray.init()` session, a benchmark) holds the defaults (6379, 8265, the
# dashboard agent's 52365, the client server's 10001) and a second head on them fails to start.
free_port() { "$ROOT/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${DEMO_RAY_PORT:-$(free_port)}
DASH=${DEMO_DASHBOARD_PORT:-$(free_port)}
AGENT=$(free_port)
CLIENT=$(free_port)
METRICS=$(free_port)
t0=$(date +%s)
if [ ! -f "$DATA/meta.json" ]; then
  dealrec prepare --format synthetic --out "$DATA"
fi
# --block keeps this cluster's processes under one command: stopping it stops them and nothing
# else (`ray stop` would stop every Ray cluster of this user on the machine).
ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" --num-cpus 2 \
  --dashboard-agent-listen-port "$AGENT" --ray-client-server-port "$CLIENT" --metrics-export-port "$METRICS" \
  --disable-usage-stats --block >"$OUT.ray-start.log" 2>&1 &
HEAD_PID=$!
cleanup() {
  kill "$HEAD_PID" 2>/dev/null || true
  wait "$HEAD_PID" 2>/dev/null || true
  # `ray start` recorded this head as the machine's current cluster; `ray stop` forgets it, a killed
  # head does not, and a later plain `ray.init()` would retry the dead address for minutes.
  local f
  f=$("$ROOT/.venv/bin/python" -c 'from ray._common.utils import get_ray_address_file as g; print(g(None))' \
      2>/dev/null) || return 0
  if [ -f "$f" ] && grep -q ":$PORT\$" "$f"; then rm -f "$f"; fi
}
trap cleanup EXIT
for _ in $(seq 180); do  # `ray start` prints this once the node (and its job agent) is up
  grep -q "Ray runtime started" "$OUT.ray-start.log" 2>/dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || { cat "$OUT.ray-start.log" >&2; echo "ray start failed" >&2; exit 1; }
  sleep 1
done
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", ".cache", "**/__pycache__", "*.egg-info"], "env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "DEALREC_CACHE": "'"$ROOT"'/.cache/dealrec"}}' \
  -- python jobs/prune_book.py --data "$DATA" --out "$OUT" --budget 128 --llm-cache "$ROOT/.cache/dealrec" --overwrite
echo
echo "demo finished in $(( $(date +%s) - t0 ))s"
echo "selected samples: $OUT/selected.parquet"
echo "report:           $OUT/report/index.html"
