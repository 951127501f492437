#!/usr/bin/env bash
# Every optimizer (bwr, pso, cma_es, random) x seeds 42 1 2 3 4 at an equal dev-evaluation budget on the demo
# objective, through search.py; prints the table of starting best, ending best and gains with paired SEs.
# Arguments go to benchmarks/compare_optimizers.py, e.g.  bash search_compare.sh --budget 60 -j 2
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1
"$PYTHON" benchmarks/compare_optimizers.py "$@"
