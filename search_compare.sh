#!/usr/bin/env bash
# Every optimizer (bwr, pso, cma_es, random) x seeds 42 1 2 3 4 at an equal dev-evaluation budget on the demo
# objective, through search.py; prints the table of starting best, ending best and gains with paired SEs.
# Arguments go to benchmarks/compare_optimizers.py, e.g.  bash search_compare.sh --budget 60 -j 2
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
export HF_HUB_OFFLINE=1
"$PYTHON" benchmarks/compare_optimizers.py "$@"
