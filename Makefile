# Two commands do everything on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv tiny data bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the embedded tiny population (base model, 10 LoRA experts, reward model); cached, rebuilt only if the recipe changes
tiny: venv
	$(PY) initial_experts/expert_init.py --tiny

# generated evaluation sets (nlgraph, the tiny objectives, the demo objective)
data: venv
	$(PY) data/build.py
	$(PY) data/tiny_demo.py

demo: tiny data
	PYTHON=$(PY) bash search_demo.sh

test: tiny data
	WANDB_MODE=disabled $(PY) -m pytest -q tests

# CPU benchmarks (benchmarks/bench_gpu.py needs a GPU: run it by hand)
bench: tiny data
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_evaluate.py
	$(PY) benchmarks/bench_search.py

clean:
	rm -rf initial_experts/tiny data/eval/tiny_*.json data/eval/nlgraph.json
