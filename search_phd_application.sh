#!/usr/bin/env bash
# BWR_model on a human-interest domain, judged by Gemini on Vertex AI ("Rating: N/10").
# Needs: the Gemma-7B experts, GPUs, and Vertex AI access: gcloud auth application-default login,
# GOOGLE_CLOUD_PROJECT (and optionally GOOGLE_CLOUD_LOCATION). Extra arguments are passed to search.py.
# Other domains: set domain_list (line 8) to names of data/eval/human_<name>.json files (published: data/build.py --published).
set -euo pipefail
cd "$(dirname "$0")"
domain_list=("human_phd_application")
PYTHON=${PYTHON:-python}
# DRY_RUN=1 prints the commands instead of running them.

for domain in "${domain_list[@]}"; do
    # Which GPUs? Edit -g: one worker per GPU id.
    ${DRY_RUN:+echo} "$PYTHON" search.py \
        -n "$domain" \
        -e human \
        -d "$domain" \
        -i initial_experts \
        -b google/gemma-7b-it \
        --populate_initial_experts 1 \
        --initial_experts_num 20 \
        -p 10 \
        -g 0,1,2,3,4 \
        -m 200 \
        --starting_test_set_eval 1 \
        --project_name_wb bwr \
        "$@"
done
