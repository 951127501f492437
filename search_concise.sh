#!/usr/bin/env bash
# BWR_model on the concise reward-model objective (reward model score + brevity) in the paper setting
# (search_common.sh). Needs the experts (python initial_experts/expert_init.py) and the prompts
# (python data/build.py --published, or python data/prepare_data.py rm). Extra arguments go to search.py, e.g.  bash search_concise.sh -m 20 -p 5
# DRY_RUN=1 prints the command instead of running it; PYTHON=... picks the interpreter; GPUS=0,1 the GPUs.
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
run_search -n concise -e rm_concise -d rm "${PAPER_SETTING[@]}" --trust_remote_code 1 "$@"
