#!/usr/bin/env bash
# BWR_model with lm-evaluation-harness tasks as the objective (-e lm_eval) in the paper setting (search_common.sh).
# The utility is the mean of the tasks' primary metrics (arc_challenge: acc; hellaswag: acc), dev = each task's
# validation split (hellaswag has no labelled test split: its validation split is cut in two by a fixed seed, dev and
# test, and log.txt says so), at most 500 dev documents per task (a seeded draw). Other tasks: TASKS=mmlu,gsm8k bash
# search_lm_eval.sh; your own YAML tasks: add --lm_eval_include_path DIR (docs/lm_eval.md).
# Needs: the experts (python initial_experts/expert_init.py), GPUs, and the tasks' data: downloaded by lm-eval through
# datasets on first use (offline, only tasks whose data is local or cached work; the others are refused at once).
# Extra arguments go to search.py, e.g.  bash search_lm_eval.sh -m 20 -p 5
# DRY_RUN=1 prints the command instead of running it; PYTHON=... picks the interpreter; GPUS=0,1 the GPUs.
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
run_search -n lm_eval -e lm_eval --lm_eval_tasks "${TASKS:-arc_challenge,hellaswag}" --lm_eval_dev_limit 500 \
    "${PAPER_SETTING[@]}" "$@"
