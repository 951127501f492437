# Two commands do everything on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv tiny rebuild-tiny data bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the embedded tiny population (base model, 10 LoRA experts, reward model) is shipped in initial_experts/tiny:
# `make tiny` verifies it against initial_experts/tiny.sha256 (a second); `make rebuild-tiny` rebuilds it with the
# recipe on this machine and compares (minutes). After a deliberate recipe change, re-record with
#   python initial_experts/expert_init.py --tiny --rebuild --record
tiny: venv
	$(PY) initial_experts/expert_init.py --tiny

rebuild-tiny: venv
	$(PY) initial_experts/expert_init.py --tiny --rebuild

# generated evaluation sets (nlgraph, the tiny objectives, the demo objective)
data: venv
	$(PY) data/build.py
	$(PY) data/tiny_demo.py

demo: tiny data
	PYTHON=$(PY) bash search_demo.sh

# two pytest workers, one test file each at a time (the suite is CPU-bound single-threaded work: 2 cores, 2 workers),
# each with one torch thread: with torch's default of one thread per core, two workers oversubscribe the two cores
# and the suite took 13m38s instead of 11m28s on the development machine
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: tiny data
	WANDB_MODE=disabled OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--durations 15 tests

# CPU benchmarks (benchmarks/bench_gpu.py needs a GPU: run it by hand)
bench: tiny data
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_evaluate.py
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_tiny.py
	$(PY) benchmarks/bench_lm_eval.py

# generated data only: initial_experts/tiny is tracked (git checkout -- initial_experts/tiny restores it)
clean:
	rm -rf data/eval/tiny_*.json data/eval/nlgraph.json
