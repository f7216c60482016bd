"""Benchmark of the routing plugin against LiteLLM's own strategies, on one real fleet.

One ``Stack`` (Redis, N Triton stand-in replicas, a sidecar each, the LiteLLM proxy with the
triage plugin and a virtual key) is started once; then, on that same fleet:

1. **Decision time**, in this process against the stack's Redis and the real replica ids:
   ``LeastBusyStrategy.choose_deployment`` (the ``pick.lua`` pick-and-reserve round trip
   included; each reservation released afterwards, release timed apart), sequential and with
   many concurrent coroutines; LiteLLM's ``simple_shuffle`` on the same deployment list; and the
   whole ``Router.async_get_available_deployment`` (LiteLLM's own filters before the choice) with
   either chooser.
2. **Proxy throughput and latency**: the same closed-loop load (N OpenAI-SDK clients for T
   seconds, short completions) through one proxy per strategy (``triage``, ``simple-shuffle``,
   ``least-busy``), all on the same replicas and key store, loaded one after another (``--rounds``
   repeats the pass, odd rounds reversed). The CPU time of every part of the stack is read from
   ``/proc`` around each measured window, and whatever else ran on the machine is shown apart.

Run: ``.venv/bin/triage bench decisions [--speeds 1,1,0.5] [--json out.json]``; ``--help``
lists the settings (also env ``TRIAGE_BENCH_DECISIONS_*``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from core.settings_errors import settings_from_cli
from devstack.proxy_launcher import LiteLLMProxy
from devstack.stack import Stack
from loadtests.bench_drive import bench_decisions, bench_proxies
from loadtests.bench_render import print_decisions, print_load
from loadtests.bench_settings import DecisionSettings
from loadtests.measure import (
    bench_logging,
    jsonable,
    machine_busy_cores,
)
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
)

log = logging.getLogger("bench_routing")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    settings = settings_from_cli(
        DecisionSettings, sys.argv[1:] if argv is None else argv, "triage bench decisions"
    )
    if settings is None:
        return 2
    stack_settings = settings.stack_settings()
    bench_logging()
    idle_busy = machine_busy_cores(1.0)
    stack = Stack(stack_settings)
    proxies: dict[str, LiteLLMProxy] = {}
    began = time.perf_counter()
    try:
        log.info("machine busy before start: %.2f cores; starting the stack", idle_busy)
        stack.start()
        log.info("stack up in %.1f s (%s)", time.perf_counter() - began, stack.workdir)
        endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
        model_list = build_proxy_config(
            stack.settings.model, stack.settings.model, endpoints, ProxyOptions()
        )["model_list"]
        decisions = asyncio.run(bench_decisions(stack, model_list, settings))
        runs = asyncio.run(bench_proxies(stack, settings, proxies))
    finally:
        for proxy in proxies.values():
            if proxy is not (stack.proxies[0] if stack.proxies else None):
                proxy.stop()
        stack.stop()
    print(
        f"\ntriage routing benchmark: {settings.replicas} replicas, speeds "
        f"{','.join(f'{s:g}' for s in stack_settings.speeds)}, {os.cpu_count()} CPU cores "
        f"({idle_busy:.2f} busy before start), total {time.perf_counter() - began:.0f} s"
    )
    print_decisions(decisions, settings)
    print_load(runs, stack, settings)
    if settings.json_path is not None:
        ratios: dict[str, float] = {}
        if "triage" in runs and "simple-shuffle" in runs:
            plugin, shuffle = runs["triage"], runs["simple-shuffle"]
            ratios["rps_triage_over_shuffle"] = plugin.rps / shuffle.rps
            ratios["p99_triage_over_shuffle"] = plugin.p99_ms / shuffle.p99_ms
        doc = {
            "settings": settings.model_dump(mode="json"),
            "speeds": stack_settings.speeds,
            "cpu_count": os.cpu_count(),
            "machine_busy_cores_before_start": idle_busy,
            "decisions": {name: asdict(r) for name, r in decisions.items()},
            "proxy_runs": {name: asdict(r) for name, r in runs.items()},
            "ratios": ratios,
        }
        settings.json_path.write_text(json.dumps(jsonable(doc), indent=2, allow_nan=False))
        print(f"\nfigures written to {settings.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
