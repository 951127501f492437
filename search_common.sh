# Sourced by the search_*.sh starter scripts: which interpreter runs search.py, and the paper setting they share.
# Not run on its own.
cd "$(dirname "${BASH_SOURCE[0]}")"

# An explicit PYTHON=... wins; else the project's .venv (what `make demo` builds); else python on PATH
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# The paper setting: Gemma-7B-it and the ten published LoRA experts (python initial_experts/expert_init.py), the
# population filled to 20 by crossover, patience 10, at most 200 iterations, one worker per GPU id.
# Which GPUs? GPUS=0,1 bash search_nlgraph.sh, or -g 0,1 as an extra argument (the last -g given wins).
# Toned down for smaller GPUs: --populate_initial_experts 0 --initial_experts_num 10 --step_length 0.5 -p 5 -m 20.
# No GPU? Try the CPU demo (bash search_demo.sh), or -g cpu (slow for a 7B model).
PAPER_SETTING=(
    -i initial_experts
    -b google/gemma-7b-it
    --populate_initial_experts 1
    --initial_experts_num 20
    -p 10
    -g "${GPUS:-0,1,2,3,4}"
    -m 200
    --starting_test_set_eval 1
    --fast_merge 1
    --project_name_wb bwr
)

# run_search ARGS...: search.py with ARGS; DRY_RUN=1 prints the command instead of running it
run_search() {
    ${DRY_RUN:+echo} "$PYTHON" search.py "$@"
}
