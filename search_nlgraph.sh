#!/usr/bin/env bash
# BWR_model on NLGraph (graph reasoning, exact match) in the paper setting (search_common.sh: Gemma-7B-it, the ten
# published experts, GPUs). Needs the experts (python initial_experts/expert_init.py) and the data
# (python data/build.py; the published file: python data/build.py --published). Extra arguments go to search.py, e.g.  bash search_nlgraph.sh -m 20 -p 5
# DRY_RUN=1 prints the command instead of running it; PYTHON=... picks the interpreter; GPUS=0,1 the GPUs.
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
run_search -n nlgraph -e exact_match -d nlgraph "${PAPER_SETTING[@]}" "$@"
