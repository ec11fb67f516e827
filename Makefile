# The two commands of the README:  make run  (the main job: the trainer)   make test  (the suite)
# Each sets up its own virtual environment on first use (only Python and pip needed).
# make check: kernel self-check + quick benchmark;  make bench: all benchmarks.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0 is the CPU wheel on our machines' local disk (a CUDA build on PyPI elsewhere);
# triton 3.6.0 is the version the GPU machine runs and whose CPU interpreter the tests use.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY := $(VENV)/bin/python

.PHONY: run check test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -e ".[test,bench,train]"
	touch $@

# The trainer's embedded default: a small CNN on the 8x8 digits, adaptive batch on.
# Pass flags with ARGS, e.g.  make run ARGS="--norm gn --max-steps 500"
run: $(VENV)/.installed
	$(PY) -m fastnorm.train $(ARGS)

check: $(VENV)/.installed
	$(PY) -m fastnorm check

# -n auto: one worker per core (at most 4; the suite's processes each hold torch + a Triton
# cache, ~1 GiB): 2 on our 2-core CI machines. PYTEST_ARGS adds flags, e.g. PYTEST_ARGS="-n 0".
test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 $(PYTEST_ARGS) tests

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info bench_results runs
