# ascribe: `make run` starts everything, `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
BENCH ?= quick
PYTEST_ARGS ?=

export PYTHONPATH := $(CURDIR):$(CURDIR)/gen
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install proto run demo migrate test unit integration e2e lint typecheck bench ipintel prometheus-rules clean

# The pinned requirements, then the project itself, editable (so .venv/bin/ascribe
# runs this checkout's code); a changed pyproject.toml (entry point, packages)
# installs again. The image's build stage runs `make install` before it has
# copied pyproject.toml: there only the requirements are installed.
$(VENV)/.installed: requirements.txt requirements-dev.txt $(wildcard pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(if $(wildcard pyproject.toml),$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .)
	touch $@

install: $(VENV)/.installed

gen/.stamp: $(VENV)/.installed $(PROTOS)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch $@

proto: $(VENV)/.installed
	rm -f gen/.stamp
	$(MAKE) gen/.stamp

run: gen/.stamp
	$(PY) -m tools.run

demo: gen/.stamp
	$(PY) -m tools.demo

migrate: gen/.stamp
	$(PY) -m tools.run --migrate-only

ipintel: $(VENV)/.installed
	$(PY) -m tools.ipintel

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

typecheck: gen/.stamp
	$(VENV)/bin/mypy services gateway tools bench ascribe_cli

unit: gen/.stamp
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

integration: gen/.stamp
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

e2e: gen/.stamp
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

test: gen/.stamp lint typecheck
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The Prometheus configuration and the alert rules' unit tests (promtool: Debian's prometheus package).
prometheus-rules:
	cd deploy/prometheus && promtool check config prometheus.yml && promtool test rules alerts_test.yml

bench: gen/.stamp
	$(PY) -m bench --mode $(BENCH)

clean:
	rm -rf gen $(VENV) .pytest_cache .mypy_cache .ruff_cache
