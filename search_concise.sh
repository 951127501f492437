#!/usr/bin/env bash
# BWR_model on the concise reward-model objective (reward model score + brevity) with the ten Gemma-7B-it LoRA experts.
#
# Needs: the experts (python initial_experts/expert_init.py), the prompts (python data/build.py --published, or python data/prepare_data.py rm), and GPUs.
# Extra arguments are passed to search.py, e.g.  bash search_concise.sh -m 20 -p 5
# Toned down for smaller GPUs: --populate_initial_experts 0 --initial_experts_num 10 --step_length 0.5 -p 5 -m 20
# No GPU? Try the CPU demo (bash search_demo.sh), or -g cpu (slow for a 7B model).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# Which GPUs? Edit the -g line below: one worker per GPU id, e.g. 0 / 0,1 / 0,2,4,5,6.
${DRY_RUN:+echo} "$PYTHON" search.py \
    -n concise \
    -e rm_concise \
    -d rm \
    -i initial_experts \
    -b google/gemma-7b-it \
    --populate_initial_experts 1 \
    --initial_experts_num 20 \
    -p 10 \
    -g 0,1,2,3,4 \
    -m 200 \
    --starting_test_set_eval 1 \
    --fast_merge 1 \
    --trust_remote_code 1 \
    --project_name_wb bwr \
    "$@"
