# syntax=docker/dockerfile:1
# A tensor-parallel TensorRT-LLM replica: NVIDIA's Triton TensorRT-LLM container with this
# project added for its launcher (deploy/images/tp_replica.py runs sidecar/tp_launcher.py's
# command line: mpirun leader mode, one tritonserver rank per GPU). Build from the repository
# root, naming NVIDIA's image (no default: pick the release whose TensorRT-LLM matches your
# engines; the engine path of `triage build-engine` needs TensorRT-LLM 1.2.x, see
# build_engines/README.md and NVIDIA's framework support matrix):
#
#   docker build -f deploy/images/triton-trtllm.Dockerfile \
#     --build-arg TRITON_TRTLLM_IMAGE=nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 \
#     -t triage-triton-trtllm:0.1.0 .
#
# The same image builds engines (`triage build-engine`, see deploy/kubernetes/README.md).
# Never built and never run on a GPU in this repository (no Docker, no GPU in its CI).
ARG TRITON_TRTLLM_IMAGE
FROM ${TRITON_TRTLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

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
COPY deploy/images/tp_replica.py ./deploy/images/tp_replica.py
# NVIDIA's packages (tensorrt_llm, torch, tritonclient, ...) are pinned as constraints: pip
# fails the build rather than replace one of them with what this project would otherwise pull
RUN python3 -m pip freeze | grep -v -e '^-e ' -e ' @ ' > /tmp/nvidia-constraints.txt \
 && python3 -m pip install -c /tmp/nvidia-constraints.txt -e . \
 && rm /tmp/nvidia-constraints.txt

EXPOSE 8000 8001 8002
ENTRYPOINT ["python3", "/opt/triage/deploy/images/tp_replica.py"]
