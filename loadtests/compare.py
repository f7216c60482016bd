"""``triage bench``: LiteLLM's own routing vs this project's plugins, on one fleet, one arrival
sequence per load level, in one run.

One embedded fleet (Redis, Triton stand-in replicas of unequal speed, a sidecar each) and, per
strategy, ``--proxies`` LiteLLM proxy processes on it:

* ``simple-shuffle``: LiteLLM's default router, no plugin;
* ``least-busy``: LiteLLM's ``least-busy`` with Redis in ``router_settings`` (its in-flight counts
  shared through Redis, as LiteLLM ships it), no plugin;
* ``triage``: the routing plugin and the admission plugin.

For each load level (a fraction of the fleet's capacity) a Poisson arrival sequence is recorded
(``arrivals-<load>.json``) and replayed open-loop against each strategy in turn (asyncio + httpx;
arrival ``i`` goes to proxy ``i mod --proxies``; no client retries: a 503 is an answer). The fleet
drains between runs. The stand-in's timing is the reference's (4 slots, 25 tokens, 0.5 s per
request at speed 1) times ``--time-scale`` so that the proxies are not the bottleneck on a small
machine; the CPU of every part is read from ``/proc`` during each run to show it. The
speed-aware oracle is replayed exactly on the same sequence (``loadtests/oracle.py``).

Run: ``triage bench [compare]`` (``--help``; every flag is also ``TRIAGE_BENCH_*``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from core.settings_errors import settings_from_cli
from devstack.stack import Stack
from loadtests.bench_drive import measure_overhead, measure_service, run_level
from loadtests.bench_fleet import Fleet, create_key, start_all_proxies
from loadtests.bench_render import bottleneck_lines, render_level, render_overhead
from loadtests.bench_results import BenchRun, compact_results, targets
from loadtests.bench_settings import BenchSettings
from loadtests.measure import bench_logging, machine_busy_cores
from loadtests.traffic import LengthDist

log = logging.getLogger("triage.bench")


async def bench(fleet: Fleet, settings: BenchSettings, run: BenchRun) -> None:
    await start_all_proxies(fleet, settings)
    log.info("proxies up: %s", {s: [p.base_url for p in ps] for s, ps in fleet.proxies.items()})
    if settings.overhead_requests:
        run.overhead = await measure_overhead(fleet, settings)
        print(render_overhead(run.overhead), flush=True)
    run.service_measured_s = await measure_service(fleet, settings)
    print(
        "\nservice time of one request alone, straight to each replica's Triton (the answer "
        "bound's service time): "
        + ", ".join(f"{rid} {v:.2f} s" for rid, v in run.service_measured_s.items()),
        flush=True,
    )
    slowest = max(run.service_measured_s.values())
    for level, load in enumerate(settings.loads):
        run.levels.append(await run_level(fleet, settings, level, load, slowest))
        print(render_level(run.levels[-1], fleet.replica_ids), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    settings = settings_from_cli(
        BenchSettings, sys.argv[1:] if argv is None else argv, "triage bench"
    )
    if settings is None:
        return 2
    stack_settings = settings.stack_settings()
    bench_logging()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    busy_before = machine_busy_cores(1.0)
    began = time.perf_counter()
    run = BenchRun(
        settings=settings,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        cpu_count=os.cpu_count() or 1,
        machine_busy_cores_before=busy_before,
    )
    speeds = ",".join(f"{s:g}" for s in settings.speeds)
    print(
        f"triage bench: {settings.replicas} replicas (speeds {speeds}), {settings.max_active} "
        f"slots, {LengthDist.parse(settings.output_tokens)} tokens x "
        f"{settings.decode_ms_per_token:g} ms = {settings.service_s():.2f} s per request at "
        f"speed 1 (reference x {settings.time_scale:g}); capacity {settings.capacity_rps():.2f} "
        f"req/s; {settings.proxies} proxy process(es) per strategy; {settings.seconds:g} s of "
        f"arrivals per run; {100 * settings.stream_fraction:.0f} % streams; machine "
        f"{busy_before:.2f} of {os.cpu_count()} cores busy before start",
        flush=True,
    )
    stack = Stack(stack_settings)
    fleet: Fleet | None = None
    try:
        stack.start()
        fleet = Fleet(stack, asyncio.run(create_key(stack)))
        asyncio.run(bench(fleet, settings, run))
    finally:
        if fleet is not None:
            fleet.stop()
        else:
            stack.stop()
    run.total_s = time.perf_counter() - began
    print("\ntargets (benchmarks, not tests):")
    for line in targets(run):
        print(line)
    print("\nis the proxy the bottleneck? (CPU from /proc during each run's arrival window)")
    for line in bottleneck_lines(run):
        print(line)
    path = settings.out_dir / "bench.json"
    path.write_text(json.dumps(run.as_json(), indent=2, allow_nan=False))
    compact = compact_results(run)
    if settings.results is not None:
        settings.results.parent.mkdir(parents=True, exist_ok=True)
        settings.results.write_text(json.dumps(compact, indent=2, allow_nan=False) + "\n")
    print(
        f"\nfigures in {path}"
        + (f" and {settings.results}" if settings.results else "")
        + f"; plots load<N>-latency.png / load<N>-replicas.png in {settings.out_dir}/; "
        f"total {run.total_s:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
