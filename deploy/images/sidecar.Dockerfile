# syntax=docker/dockerfile:1
# The load sidecar (sidecar/service.py): one beside every Triton replica, publishing the
# replica's load to Redis. Settings come from TRIAGE_SIDECAR_* variables (sidecar/settings.py).
# Build from the repository root:
#
#   docker build -f deploy/images/sidecar.Dockerfile -t triage-sidecar:0.1.0 .
#
# It installs the whole project (the same dependency set CI tests), not a trimmed one. Never
# built in this repository's CI (no Docker there).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/triage
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins
COPY sidecar ./sidecar
COPY devstack ./devstack
COPY triage ./triage
COPY build_engines ./build_engines
COPY loadtests ./loadtests
RUN pip install -e . \
 && useradd --uid 10001 --home-dir /opt/triage --no-create-home --shell /usr/sbin/nologin triage

USER 10001
EXPOSE 9400
ENTRYPOINT ["python", "-m", "sidecar.service"]
