# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv (pinned CPU torch + megamoe) and trains the tiny Mixtral demo (4 ranks, ~6 min)
#   make test   creates .venv and runs the default test pass (make test-full: the larger matrices too)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-full bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	PYTHON=$(PY) bash examples/mixtral/train_tiny_cpu.sh

test: setup
	$(PY) -m pytest

test-full: setup
	$(PY) -m pytest --full

bench: setup
	$(PY) bench/matmul_peak.py
	$(PY) bench/moe_layer.py
	$(PY) bench/gloo_pool_overhead.py
	$(PY) bench/preprocess.py
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 4 bench/data_parallel.py

clean:
	rm -rf $(VENV) .pytest_cache
