#!/usr/bin/env bash
# BWR_model on a human-interest domain, judged by Gemini on Vertex AI ("Rating: N/10"), in the paper setting
# (search_common.sh). Needs the Gemma-7B experts, GPUs, and Vertex AI access: gcloud auth application-default login,
# GOOGLE_CLOUD_PROJECT (and optionally GOOGLE_CLOUD_LOCATION). Extra arguments go to search.py.
# Other domains: set domain_list below to names of data/eval/human_<name>.json files (the
# published ones: python data/build.py --published).
# DRY_RUN=1 prints the commands instead of running them; PYTHON=... picks the interpreter; GPUS=0,1 the GPUs.
set -euo pipefail
source "$(dirname "$0")/search_common.sh"
domain_list=("human_phd_application")
for domain in "${domain_list[@]}"; do
    run_search -n "$domain" -e human -d "$domain" "${PAPER_SETTING[@]}" "$@"
done
