# Two commands on a fresh machine: `make demo` (set up, train the embedded default) and `make test`.
# Setup pins the CPU build of torch; pyproject keeps torch>=2.6 so GPU users bring their own build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo demo-sft test test-fast bench-consolidate bench-data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/tune-launch examples/pretrain-tiny.yaml

demo-sft: setup
	$(VENV)/bin/tune-launch examples/sft-tiny.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS) tests

bench-consolidate: setup
	$(PY) -m bench.consolidate

bench-data: setup
	$(PY) -m bench.data

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
