# Two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU wheel of torch (a bare `torch` would pull a multi-GB CUDA build); constraints pin the set
# verified to co-install (pandas<3 is required by evidently 0.7.23).
TORCH := torch==2.13.0

export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast lint schema clean setup postgres promtool redis

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lockgate run

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

test: $(STAMP) postgres promtool redis
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

schema: $(STAMP)
	$(BIN)/lockgate schema > schemas/pipelines.schema.json

clean:
	rm -rf .lockgate reports/demo
