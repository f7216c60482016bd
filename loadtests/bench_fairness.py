"""Benchmark of fair share between tenants (not a test): one tenant floods, the others send
steadily, at more than the fleet's capacity, through the admission gate with fair share on and
with first come, first served within a tier (``TRIAGE_ADMISSION_FAIR_SHARE=false``, the gate
before issue 18), on the same recorded arrivals; then the same arrivals without the flood (the
steady tenants' reference latency), and with a time-to-first-token deadline on the steady
tenants' streams.

Each tenant is its own virtual key (its own flow, weight 1). The steady tenants each send at
rate ``r``, the flooding one at ``flood_multiple x r``, all together ``load x capacity``.
Printed per run: each steady tenant's goodput against its fair share (``min(its demand,
capacity / tenants)``), its p95 against the run without the flood, Jain's fairness index over
the steady tenants' goodput / fair share, the flood's goodput, and with a deadline the share of
admitted streams whose first token came within it.

Run: ``.venv/bin/triage bench fairness [--tenants '[2, 10]'] [--seconds 40]`` (every flag is
also ``TRIAGE_BENCH_FAIRNESS_*``; about 8 minutes; on a quiet machine).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from core.settings_errors import settings_from_cli
from devstack.proxy_launcher import LiteLLMProxy
from devstack.stack import Stack
from loadtests.bench_drive import send as send_request
from loadtests.bench_fleet import wait_idle
from loadtests.bench_settings import FleetSettings
from loadtests.measure import percentile
from loadtests.report import Record
from plugins.admission.settings import DEADLINE_HEADER


class FairnessSettings(FleetSettings):
    """Settings of ``triage bench fairness``: flags or ``TRIAGE_BENCH_FAIRNESS_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_FAIRNESS_",
        cli_kebab_case=True,
        cli_prog_name="triage bench fairness",
        cli_shortcuts={"json-path": "json"},
        extra="forbid",
    )

    tenants: list[int] = Field(default=[2, 10], description="tenant counts, one set of runs each")
    flood_multiple: float = Field(default=5.0, gt=1, description="the flood's rate / a steady's")
    load: float = Field(default=1.2, gt=0, le=5, description="offered load / fleet capacity")
    seconds: float = Field(default=40.0, gt=0, description="arrival window per run")
    max_tokens: int = Field(default=20, ge=1, description="tokens per request")
    decode_ms_per_token: float = Field(default=25.0, gt=0, description="stand-in step time")
    stream_fraction: float = Field(default=0.5, ge=0, le=1, description="streamed share")
    deadline_ms: float = Field(
        default=3000.0, gt=0, description="the steady tenants' TTFT deadline in the deadline run"
    )
    max_wait_ms: int = Field(default=10_000, ge=0, description="the gate's longest wait")
    seed: int = Field(default=7, ge=0)
    json_path: Path | None = Field(default=None, description="write the figures here")

    def capacity_rps(self) -> float:
        """Completions per second with every batch slot busy (no batch slowdown)."""
        service_s = self.max_tokens * self.decode_ms_per_token / 1000.0
        return sum(self.max_active * s for s in self.speeds) / service_s


@dataclass(frozen=True)
class Arrival:
    t: float
    tenant: int
    stream: bool


def arrivals(settings: FairnessSettings, tenants: int, flood: bool) -> list[Arrival]:
    """Poisson arrivals per tenant (tenant 0 floods), seeded: the same list for every gate;
    ``flood=False`` drops tenant 0's."""
    steady_rate = _steady_rate(settings, tenants)
    out: list[Arrival] = []
    for tenant in range(tenants):
        rng = random.Random(settings.seed * 1000 + tenant)
        rate = steady_rate * (settings.flood_multiple if tenant == 0 else 1.0)
        t = rng.expovariate(rate)
        while t < settings.seconds:
            out.append(Arrival(t, tenant, rng.random() < settings.stream_fraction))
            t += rng.expovariate(rate)
    out.sort(key=lambda a: a.t)
    return [a for a in out if flood or a.tenant != 0]


@dataclass
class Result:
    tenant: int
    status: int
    """200 for an answer served in full; 599 for a stream that ended with an error event; 0
    for no answer."""
    latency_s: float
    ttft_s: float | None = None
    stream: bool = False
    code: str = ""

    @classmethod
    def of(cls, tenant: int, record: Record) -> Result:
        """A tenant's request as ``bench_drive.send`` recorded it (the one reading of an answer,
        ``loadtests/traffic.py``)."""
        if record.outcome == "ok":
            status, code = 200, ""
        elif record.outcome == "lost":
            status, code = 0, record.detail
        else:  # a refusal ("503 queue_full"), or an error event in a 200 stream
            status = record.status if record.status != 200 else 599
            code = record.detail.split(" ", 1)[-1]
        return cls(tenant, status, record.latency_s, record.ttft_s, record.stream, code)


async def send(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    arrival: Arrival,
    settings: FairnessSettings,
    deadline_ms: float | None,
) -> Result:
    body = {
        "model": "standin",
        "messages": [{"role": "user", "content": f"tenant {arrival.tenant} asks"}],
        "max_tokens": settings.max_tokens,
        "stream": arrival.stream,
    }
    headers = None if deadline_ms is None else {DEADLINE_HEADER: f"{deadline_ms:g}"}
    record = await send_request(client, url, key, body, arrival.t, headers)
    return Result.of(arrival.tenant, record)


def _steady_rate(settings: FairnessSettings, tenants: int) -> float:
    """Each steady tenant's rate: with the flood at ``flood_multiple`` x it, all together
    ``load`` x the capacity."""
    return settings.load * settings.capacity_rps() / (tenants - 1 + settings.flood_multiple)


async def replay(
    url: str,
    keys: list[str],
    plan: list[Arrival],
    settings: FairnessSettings,
    deadline_ms: float | None = None,
) -> list[Result]:
    """Send every arrival at its time (open loop) and wait for every answer."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        began = time.perf_counter()
        tasks = []
        for arrival in plan:
            await asyncio.sleep(max(0.0, began + arrival.t - time.perf_counter()))
            deadline = deadline_ms if arrival.tenant != 0 else None
            tasks.append(
                asyncio.create_task(
                    send(client, url, keys[arrival.tenant], arrival, settings, deadline)
                )
            )
        return list(await asyncio.gather(*tasks))


@dataclass
class TenantFigures:
    tenant: int
    sent: int
    ok: int
    shed: int
    goodput_rps: float
    fair_share_rps: float
    p95_s: float
    ttft_within_deadline: float | None = None


@dataclass
class RunFigures:
    name: str
    tenants: list[TenantFigures]
    jain: float
    codes: dict[str, int] = field(default_factory=dict)


def figures(
    name: str,
    results: list[Result],
    tenants: int,
    settings: FairnessSettings,
    deadline_ms: float | None = None,
) -> RunFigures:
    capacity = settings.capacity_rps()
    steady_rate = _steady_rate(settings, tenants)
    rows = []
    codes: dict[str, int] = {}
    for tenant in range(tenants):
        mine = [r for r in results if r.tenant == tenant]
        if not mine:
            continue
        ok = [r for r in mine if r.status == 200]
        for r in mine:
            if r.status != 200:
                codes[f"{r.status} {r.code}"] = codes.get(f"{r.status} {r.code}", 0) + 1
        demand = steady_rate * (settings.flood_multiple if tenant == 0 else 1.0)
        within = None
        if deadline_ms is not None and tenant != 0:
            streams = [r for r in ok if r.stream and r.ttft_s is not None]
            if streams:
                inside = sum(1 for r in streams if (r.ttft_s or 0) * 1000 <= deadline_ms)
                within = inside / len(streams)
        rows.append(
            TenantFigures(
                tenant=tenant,
                sent=len(mine),
                ok=len(ok),
                shed=sum(1 for r in mine if r.status in (429, 503)),
                goodput_rps=len(ok) / settings.seconds,
                fair_share_rps=min(demand, capacity / tenants),
                p95_s=percentile([r.latency_s for r in ok], 95),
                ttft_within_deadline=within,
            )
        )
    steady = [row.goodput_rps / row.fair_share_rps for row in rows if row.tenant != 0]
    jain = sum(steady) ** 2 / (len(steady) * sum(x * x for x in steady)) if steady else math.nan
    return RunFigures(name, rows, jain, codes)


def render(tenants: int, runs: dict[str, RunFigures], settings: FairnessSettings) -> str:
    capacity = settings.capacity_rps()
    lines = [
        f"\n{tenants} tenants, tenant 0 floods at {settings.flood_multiple:g}x a steady one's "
        f"rate, {100 * settings.load:.0f} % of capacity ({capacity:.1f} req/s), "
        f"{settings.seconds:g} s of arrivals",
        "| run | steady goodput / fair share (min, mean) | steady p95 s (max) | steady p95 / "
        "no flood (max) | Jain (steady) | flood goodput req/s | flood share of ok | answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = runs.get("fair, no flood")
    for name, run in runs.items():
        steady = [t for t in run.tenants if t.tenant != 0]
        flood = next((t for t in run.tenants if t.tenant == 0), None)
        ratios = [t.goodput_rps / t.fair_share_rps for t in steady]
        p95 = max(t.p95_s for t in steady)
        vs = "-"
        if base is not None:
            ref = {t.tenant: t.p95_s for t in base.tenants}
            vs = f"{max(t.p95_s / ref[t.tenant] for t in steady if t.tenant in ref):.2f}x"
        total_ok = sum(t.ok for t in run.tenants)
        share = f"{100 * flood.ok / total_ok:.0f} %" if flood and total_ok else "-"
        lines.append(
            f"| {name} | {min(ratios):.2f} / {sum(ratios) / len(ratios):.2f} | {p95:.2f} | "
            f"{vs} | {run.jain:.3f} | {flood.goodput_rps if flood else 0:.2f} | {share} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(run.codes.items())) or 'all 200'} |"
        )
        within = [t.ttft_within_deadline for t in steady if t.ttft_within_deadline is not None]
        if within:
            lines.append(
                f"|   ({name}: steady streams with TTFT within {settings.deadline_ms:g} ms: "
                f"min {100 * min(within):.1f} %, mean {100 * sum(within) / len(within):.1f} %) "
                "| | | | | | | |"
            )
    return "\n".join(lines)


async def measure(stack: Stack, fifo: LiteLLMProxy, settings: FairnessSettings) -> list[str]:
    out: list[str] = []
    payload: dict[str, object] = {}
    fair_url = f"{stack.proxies[0].base_url}/v1/chat/completions"
    fifo_url = f"{fifo.base_url}/v1/chat/completions"
    for tenants in settings.tenants:
        keys = [await stack.create_key(f"tenant-{tenants}-{i}") for i in range(tenants)]
        warm = arrivals(settings, tenants, flood=False)[:4]
        await replay(fair_url, keys, warm, settings)  # every replica measured once
        await replay(fifo_url, keys, warm, settings)
        plans = {
            "fair share": (fair_url, True, None),
            "fifo in tier (before)": (fifo_url, True, None),
            "fair, no flood": (fair_url, False, None),
            "fair, steady TTFT deadline": (fair_url, True, settings.deadline_ms),
        }
        runs: dict[str, RunFigures] = {}
        for name, (url, flood, deadline) in plans.items():
            await wait_idle(stack, 180.0)
            plan = arrivals(settings, tenants, flood)
            results = await replay(url, keys, plan, settings, deadline)
            runs[name] = figures(name, results, tenants, settings, deadline)
        out.append(render(tenants, runs, settings))
        payload[str(tenants)] = {name: asdict(run) for name, run in runs.items()}
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps(payload, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    args = settings_from_cli(FairnessSettings, argv or [], "triage bench fairness")
    if args is None:
        return 2
    if any(t < 2 for t in args.tenants):
        print("every --tenants value must be >= 2 (one floods, the others are steady)")
        return 2
    os.environ["TRIAGE_ADMISSION_MAX_WAIT_MS"] = str(args.max_wait_ms)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="triage-fairness-"))
    stack_settings = args.model_copy(update={"workdir": workdir}).stack_settings(
        decode_ms_per_token=args.decode_ms_per_token,
        batch_slowdown=0.0,  # the capacity is then Σ slots x speed / service, at any batch
        proxies=1,
    )
    stack = Stack(stack_settings).start()
    try:
        # a second proxy of the stack's config: first come, first served within a tier
        fifo = stack.start_proxy("proxy-fifo", {"TRIAGE_ADMISSION_FAIR_SHARE": "false"})
        tables = asyncio.run(measure(stack, fifo, args))
    finally:
        stack.stop()
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
