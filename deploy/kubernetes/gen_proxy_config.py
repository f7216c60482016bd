"""Write the LiteLLM proxy config of a Kubernetes overlay with ``plugins/proxy_config.py``.

The proxies' config is a ConfigMap made from a YAML file in the overlay (base:
``base/proxy/litellm-config.yaml``). It names one deployment per Triton replica pod:
``model_info.id`` = the pod's name (the replica id its sidecar publishes under), ``api_base`` =
the pod's stable DNS name (``<statefulset>-<i>.<headless service>``). After changing the number
of replicas, the model or the dialect, write the file again::

    .venv/bin/python deploy/kubernetes/gen_proxy_config.py --replicas 3 \\
        > deploy/kubernetes/base/proxy/litellm-config.yaml

``tests/test_deploy_kubernetes.py`` renders every overlay and fails, printing the expected
file, when its config differs from what ``build_proxy_config`` makes of the rendered
StatefulSet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
)

DATABASE_URL = "os.environ/DATABASE_URL"
HEADER = (
    "# LiteLLM proxy config, written by deploy/kubernetes/gen_proxy_config.py with\n"
    "# plugins/proxy_config.py's build_proxy_config: do not edit by hand, run it again.\n"
    "# {command}\n"
)


def replica_endpoints(
    statefulset: str, service: str, replicas: int, port: int
) -> list[ReplicaEndpoint]:
    """One endpoint per StatefulSet pod: its name and its DNS name under the headless service."""
    return [
        ReplicaEndpoint(f"{statefulset}-{i}", f"http://{statefulset}-{i}.{service}:{port}")
        for i in range(replicas)
    ]


def k8s_proxy_config(
    model_name: str,
    triton_model: str,
    dialect: str | None,
    endpoints: list[ReplicaEndpoint],
    database: bool = False,
) -> dict[str, Any]:
    """``build_proxy_config`` with the default options (both plugins, triage routing); with
    ``database``, LiteLLM's own keys in PostgreSQL instead of the offline key store
    (``plugins/auth/README.md``: drop ``custom_auth``, set ``database_url``)."""
    config = build_proxy_config(model_name, triton_model, endpoints, ProxyOptions(), dialect)
    if database:
        general = config["general_settings"]
        del general["custom_auth"]
        general["database_url"] = DATABASE_URL
    return config


def render(config: dict[str, Any], command: str) -> str:
    return HEADER.format(command=command) + yaml.safe_dump(config, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/kubernetes/gen_proxy_config.py", description=__doc__
    )
    parser.add_argument("--model-name", default="standin", help="the model clients ask for")
    parser.add_argument("--triton-model", default="standin", help="the Triton model called")
    parser.add_argument(
        "--dialect", default="inflight_batcher_llm", help="inflight_batcher_llm or llmapi"
    )
    parser.add_argument("--replicas", type=int, default=2, help="the StatefulSet's replicas")
    parser.add_argument("--statefulset", default="triage-replica")
    parser.add_argument("--service", default="triage-replica", help="its headless service")
    parser.add_argument("--port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--database", action="store_true", help="LiteLLM keys in PostgreSQL")
    args = parser.parse_args(argv)
    endpoints = replica_endpoints(args.statefulset, args.service, args.replicas, args.port)
    config = k8s_proxy_config(
        args.model_name, args.triton_model, args.dialect, endpoints, args.database
    )
    words = ["gen_proxy_config.py", *(argv if argv is not None else sys.argv[1:])]
    sys.stdout.write(render(config, " ".join(words)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
