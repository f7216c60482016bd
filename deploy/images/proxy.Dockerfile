# syntax=docker/dockerfile:1
# The LiteLLM proxy with the triage plugins: `python -m plugins.proxy_main` (LiteLLM's own CLI,
# its app behind the front door). The same image runs `triage keys` and Locust
# (loadtests/locustfile.py) in the load-test Job. Build from the repository root:
#
#   docker build -f deploy/images/proxy.Dockerfile -t triage-proxy:0.1.0 .
#   docker build -f deploy/images/proxy.Dockerfile --build-arg WITH_PRISMA=1 -t triage-proxy:0.1.0-db .
#
# WITH_PRISMA=1 adds Prisma's client for LiteLLM's own database (overlays/postgres); it downloads
# Prisma's engines at build time into $HOME/.cache (owned by the runtime user, who may need to
# write there when LiteLLM migrates its schema). Never built in this repository's CI (no Docker
# there), and the Prisma path never ran here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG WITH_PRISMA=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HOME=/opt/triage

WORKDIR /opt/triage
# The source stays here: the install is editable because the Lua scripts and data folders live
# beside the modules (core/paths.py finds them from the source tree).
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins
COPY sidecar ./sidecar
COPY devstack ./devstack
COPY triage ./triage
COPY build_engines ./build_engines
COPY loadtests ./loadtests
# pyproject.toml pins litellm[proxy] (the proxy extras) with the rest of the dependencies
RUN pip install -e . \
 && if [ "$WITH_PRISMA" = "1" ]; then \
      pip install prisma \
      && prisma generate --schema "$(python -c 'import litellm, os; print(os.path.join(os.path.dirname(litellm.__file__), "proxy", "schema.prisma"))')"; \
    fi \
 && useradd --uid 10001 --home-dir /opt/triage --no-create-home --shell /usr/sbin/nologin triage \
 && mkdir -p /opt/triage/.cache \
 && chown -R 10001 /opt/triage/.cache

USER 10001
EXPOSE 4000
ENTRYPOINT ["python", "-m", "plugins.proxy_main"]
CMD ["--config", "/etc/triage/proxy/config.yaml", "--host", "0.0.0.0", "--port", "4000", "--num_workers", "1"]
