# syntax=docker/dockerfile:1
# A Triton replica without a GPU: the real `tritonserver` 2.51 shipped in the nvidia-pytriton
# wheel, serving the CPU stand-in of a TensorRT-LLM replica (triton_models/cpu_standin/, the
# stock ensemble's shape and TensorRT-LLM's metrics). deploy/images/triton_standin.py writes the
# repository and execs the server (TRIAGE_STANDIN_* settings). Build from the repository root:
#
#   docker build -f deploy/images/triton-standin.Dockerfile -t triage-triton-standin:0.1.0 .
#
# The wheel's tritonserver needs glibc >= 2.35 (manylinux_2_35): bookworm has 2.36. Never built
# in this repository's CI (no Docker there); the same server runs there from the same wheel.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/opt/triage-cache

WORKDIR /opt/triage
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins
COPY sidecar ./sidecar
COPY devstack ./devstack
COPY triage ./triage
COPY build_engines ./build_engines
COPY loadtests ./loadtests
COPY triton_models ./triton_models
COPY deploy/images/triton_standin.py ./deploy/images/triton_standin.py
# the python backend folder with the stub for this interpreter is assembled once, here, so the
# server starts as a non-root user with nothing to write but its model repository
RUN pip install -e . \
 && python -c "from devstack.triton_launcher import python_backend_dir; print(python_backend_dir())" \
 && useradd --uid 10001 --home-dir /opt/triage --no-create-home --shell /usr/sbin/nologin triage \
 && mkdir -p /opt/triage-models \
 && chown 10001 /opt/triage-models

USER 10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["python", "/opt/triage/deploy/images/triton_standin.py"]
