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
	$(VENV)/bin/mypy services gateway tools bench ascribe_cli tests

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

# Reports: recompute [FROM, TO) (ISO 8601; default the last 30 days) from the
# raw events and compare with what GetReport answers; exit 1 on any drift.
.PHONY: report-drift
report-drift: gen/.stamp
	$(PY) -m services.attribution.reports.drift $(if $(FROM),--from $(FROM)) $(if $(TO),--to $(TO))

clean:
	rm -rf gen $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The Docker image's install steps in a clean venv, and the three services
# started from it (no container engine runs here); about 100 s, also in `make test`.
.PHONY: image-check
image-check: gen/.stamp
	$(PY) -m pytest -q tests/integration/test_runtime_image.py $(PYTEST_ARGS)

# ---- API hygiene: buf and the Node interop client (tools/node, from npm) ----
# `make node-tools` installs tools/node's package-lock.json (buf, @grpc/grpc-js,
# @grpc/proto-loader) into tools/node/node_modules; it does nothing when the
# lock has not changed since. No install scripts run: none of them is needed.
NODE_TOOLS := tools/node
BUF := $(NODE_TOOLS)/node_modules/.bin/buf
BUF_AGAINST ?=

.PHONY: node-tools buf-lint buf-format buf-format-check buf-breaking buf-check node-interop

$(NODE_TOOLS)/node_modules/.installed: $(NODE_TOOLS)/package.json $(NODE_TOOLS)/package-lock.json
	cd $(NODE_TOOLS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

node-tools: $(NODE_TOOLS)/node_modules/.installed

buf-lint: node-tools
	$(BUF) lint

# Rewrites protos/ in buf's format (run once after merging, then commit).
buf-format: node-tools
	$(BUF) format -w

buf-format-check: node-tools
	$(BUF) format --diff --exit-code

buf-breaking: node-tools $(VENV)/.installed
	$(PY) -m tools.buf_breaking --buf $(BUF) $(if $(BUF_AGAINST),--against $(BUF_AGAINST))

# What CI runs: lint, the format check and breaking changes; -k reports all
# three before it fails.
buf-check:
	@$(MAKE) --no-print-directory -k buf-lint buf-format-check buf-breaking

node-interop: gen/.stamp node-tools
	$(PY) -m pytest -q tests/e2e/test_node_interop.py $(PYTEST_ARGS)

# ---- the gateway against its OpenAPI description (schemathesis; also in `make test`) ----
.PHONY: openapi-check
openapi-check: gen/.stamp
	$(PY) -m pytest -q tests/e2e/test_openapi_schemathesis.py $(PYTEST_ARGS)
