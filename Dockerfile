# One image for the three services; docker-compose.yml picks the command.
# Build stage: the dev requirements carry the stub generators `make proto` uses;
# only the runtime requirements and the generated stubs reach the final image.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt requirements-dev.txt Makefile ./
RUN make install PYTHON=python3
COPY protos protos
RUN make proto
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --home-dir /app ascribe
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen gen
COPY services services
COPY gateway gateway
COPY tools tools
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ASCRIBE_LOG_FORMAT=json
USER ascribe
EXPOSE 50051 50052 8080 9101 9102
CMD ["python", "-m", "gateway"]
