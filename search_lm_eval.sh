#!/usr/bin/env bash
# BWR_model with lm-evaluation-harness tasks as the objective (-e lm_eval), on the ten Gemma-7B-it LoRA experts.
#
# The utility is the mean of the tasks' primary metrics (arc_challenge: acc; hellaswag: acc), dev = each task's
# validation split (hellaswag has no labelled test split: its validation split is cut in two by a fixed seed, dev and
# test, and log.txt says so), at most 500 dev documents per task (a seeded draw). Other tasks: TASKS=mmlu,gsm8k bash
# search_lm_eval.sh; your own YAML tasks: add --lm_eval_include_path DIR (README, "lm-evaluation-harness tasks").
# Needs: the experts (python initial_experts/expert_init.py), GPUs, and the tasks' data: downloaded by lm-eval through
# datasets on first use (offline, only tasks whose data is local or cached work; the others are refused at once).
# Extra arguments are passed to search.py, e.g.  bash search_lm_eval.sh -m 20 -p 5
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# Which GPUs? Edit the -g line below: one worker per GPU id, e.g. 0 / 0,1 / 0,2,4,5,6.
${DRY_RUN:+echo} "$PYTHON" search.py \
    -n lm_eval \
    -e lm_eval \
    --lm_eval_tasks "${TASKS:-arc_challenge,hellaswag}" \
    --lm_eval_dev_limit 500 \
    -i initial_experts \
    -b google/gemma-7b-it \
    --populate_initial_experts 1 \
    --initial_experts_num 20 \
    -p 10 \
    -g 0,1,2,3,4 \
    -m 200 \
    --starting_test_set_eval 1 \
    --fast_merge 1 \
    --project_name_wb bwr \
    "$@"
