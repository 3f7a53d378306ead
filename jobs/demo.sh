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
PORT=${DEMO_RAY_PORT:-6390}
DASH=${DEMO_DASHBOARD_PORT:-8265}
t0=$(date +%s)
if [ ! -f "$DATA/meta.json" ]; then
  dealrec prepare --format synthetic --out "$DATA"
fi
ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" --num-cpus 2 \
  --disable-usage-stats >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", ".cache", "**/__pycache__", "*.egg-info"], "env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "DEALREC_CACHE": "'"$ROOT"'/.cache/dealrec"}}' \
  -- python jobs/prune_book.py --data "$DATA" --out "$OUT" --budget 128 --llm-cache "$ROOT/.cache/dealrec" --overwrite
echo
echo "demo finished in $(( $(date +%s) - t0 ))s"
echo "selected samples: $OUT/selected.parquet"
echo "report:           $OUT/report/index.html"
