#!/usr/bin/env bash
# BWR_model on the legal domain (multitask: hearsay + citation_prediction_classification, harmonic mean) in the
# paper setting (search_common.sh). Needs the experts (python initial_experts/expert_init.py) and the data
# (python data/build.py --published, or python data/prepare_data.py hearsay
# citation_prediction_classification).
# Extra arguments go to search.py, e.g.  bash search_legal.sh -m 20 -p 5
# DRY_RUN=1 prints the command instead of running it; PYTHON=... picks the interpreter; GPUS=0,1 the GPUs.
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
run_search -n legal -e multitask -d legal "${PAPER_SETTING[@]}" "$@"
