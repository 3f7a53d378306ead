#!/usr/bin/env bash
# The prepared GPU check (issue 22 Part 2): effort at LLaMA-7B shape, an 8-layer Book projection,
# the compiled influence pass at the Games surrogate shape, effort at SmolLM2 shape on Games prompt
# lengths. engine/ code only (no Ray, no DeepSpeed); at most ~8 minutes on one H200; writes one JSON
# (default $OUT/gpu_results.json). See benchmarks/gpu/bench.py and docs/gpu.md.
#
#   bash benchmarks/gpu/run.sh                         # on the GPU machine
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/dry.json   # CPU, tiny shapes (tests/unit runs it)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The parts keep their own budgets (about 7.5 min in all); this is the backstop for a hang. The
# JSON is rewritten after every part, so a kill here keeps what finished.
exec timeout --kill-after=10 480 "$py" benchmarks/gpu/bench.py "$@"
