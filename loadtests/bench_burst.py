"""Benchmark of a flood through one proxy process (not a test): bursts of k x the fleet's
capacity sent at once, on the embedded stack (real Redis, Triton stand-in replicas, sidecars,
the LiteLLM proxy with the triage plugins behind the front door).

For each burst it prints: the answers (200 / 503 / other), how long the 503s took end to end
(p50 / p99, from sending to the whole answer), the served requests' p99 against a burst of
exactly the capacity (no excess), the Retry-After given, the share of turned-away clients that
got in when they waited their Retry-After once and retried, and the proxy's peak RSS.

Run: ``.venv/bin/triage bench burst [--bursts 3,8,10,30] [--speeds 1,1,0.5]`` (every flag is
also ``TRIAGE_BENCH_BURST_*``; about 3 minutes; on a quiet machine: the client shares the CPU
with the proxy).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from core.settings_errors import settings_from_cli
from devstack.stack import Stack
from loadtests.bench_settings import FleetSettings

QUEUE_ALLOWANCE = 4
"""The admission plugin's default ``queue_allowance`` (work per replica beyond max_active)."""


@dataclass
class Outcome:
    status: int
    sent: float
    ended: float
    retry_after_s: float | None = None
    retried_status: int | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.sent


@dataclass
class BurstReport:
    multiple: float
    sent: int
    ok: int
    shed: int
    other: int
    shed_p50_ms: float | None
    shed_p99_ms: float | None
    served_p99_s: float | None
    retry_after_p50_s: float | None
    retry_after_max_s: float | None
    retried_ok: int
    retry_success: float | None
    proxy_rss_peak_mb: float
    statuses: dict[str, int] = field(default_factory=dict)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        await asyncio.sleep(0.1)


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Outcome:
    sent = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
            retry_ms = response.headers.get("retry-after-ms")
    except aiohttp.ClientError:
        return Outcome(0, sent, time.perf_counter())
    outcome = Outcome(status, sent, time.perf_counter())
    if status == 503 and retry_ms:
        outcome.retry_after_s = int(retry_ms) / 1000
    return outcome


async def retry(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], first: Outcome
) -> None:
    """Wait the Retry-After once (from when the 503 arrived), then try again once."""
    assert first.retry_after_s is not None
    await asyncio.sleep(max(0.0, first.ended + first.retry_after_s - time.perf_counter()))
    again = await one(session, url, body, headers)
    first.retried_status = again.status


async def burst(
    stack: Stack, count: int, multiple: float, max_tokens: int, retry_503: bool
) -> BurstReport:
    assert stack.api_key is not None
    proxy = stack.proxies[0]
    url = f"{proxy.base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {stack.api_key}", "content-type": "application/json"}
    body = json.dumps(
        {
            "model": stack.settings.model,
            "messages": [{"role": "user", "content": "Tell me about the fleet."}],
            "max_tokens": max_tokens,
        }
    ).encode()
    peak = [rss_mb(proxy.process.pid)]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(proxy.process.pid, peak, stop))
    # aiohttp, one connection per request: its client costs a fifth of httpx's, and the client
    # shares the machine with the proxy (measured here: a burst of 240 / 720 against a no-op
    # server takes p50 56 / 214 ms with aiohttp, 300 / 956 ms with httpx)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        outcomes = await asyncio.gather(*(one(session, url, body, headers) for _ in range(count)))
        shed = [o for o in outcomes if o.status == 503 and o.retry_after_s is not None]
        if retry_503:
            await asyncio.gather(*(retry(session, url, body, headers, o) for o in shed))
    stop.set()
    await sampler
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    shed_ms = [o.seconds * 1000 for o in outcomes if o.status == 503]
    served = [o.seconds for o in outcomes if o.status == 200]
    retry_after = [o.retry_after_s for o in shed if o.retry_after_s is not None]
    retried_ok = sum(1 for o in shed if o.retried_status == 200)
    return BurstReport(
        multiple=multiple,
        sent=count,
        ok=len(served),
        shed=len(shed_ms),
        other=count - len(served) - len(shed_ms),
        shed_p50_ms=quantile(shed_ms, 0.5),
        shed_p99_ms=quantile(shed_ms, 0.99),
        served_p99_s=quantile(served, 0.99),
        retry_after_p50_s=quantile(retry_after, 0.5),
        retry_after_max_s=max(retry_after) if retry_after else None,
        retried_ok=retried_ok,
        retry_success=retried_ok / len(shed) if shed and retry_503 else None,
        proxy_rss_peak_mb=peak[0],
        statuses=statuses,
    )


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(capacity: int, reports: list[BurstReport], baseline: BurstReport) -> str:
    lines = [
        f"fleet capacity {capacity} (max_active + queue allowance per replica); one proxy process",
        f"{'burst':>6} {'sent':>5} {'200':>5} {'503':>5} {'other':>5} "
        f"{'503 p50 ms':>10} {'503 p99 ms':>10} {'200 p99 s':>9} {'vs base':>7} "
        f"{'RA p50 s':>8} {'RA max s':>8} {'retry ok':>9} {'RSS MB':>7}",
    ]
    for r in [baseline, *reports]:
        ratio = (
            r.served_p99_s / baseline.served_p99_s
            if r.served_p99_s and baseline.served_p99_s
            else None
        )
        retry_ok = f"{r.retry_success * 100:.0f}% ({r.retried_ok}/{r.shed})" if r.shed else "-"
        lines.append(
            f"{r.multiple:>5g}x {r.sent:>5} {r.ok:>5} {r.shed:>5} {r.other:>5} "
            f"{fmt(r.shed_p50_ms, '10.0f')} {fmt(r.shed_p99_ms, '10.0f')} "
            f"{fmt(r.served_p99_s, '9.2f')} {fmt(ratio, '6.2f')}x "
            f"{fmt(r.retry_after_p50_s, '8.1f')} {fmt(r.retry_after_max_s, '8.1f')} "
            f"{retry_ok:>9} {r.proxy_rss_peak_mb:>7.0f}"
        )
    return "\n".join(lines)


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


class BurstSettings(FleetSettings):
    """Settings of ``triage bench burst``: flags or ``TRIAGE_BENCH_BURST_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_BURST_",
        cli_kebab_case=True,
        cli_prog_name="triage bench burst",
        cli_shortcuts={"json-path": "json"},
        extra="forbid",
    )

    bursts: list[float] = Field(default=[3, 8, 10, 30], description="multiples of the capacity")
    max_tokens: int = Field(default=50, ge=1, description="tokens per request")
    idle_s: float = Field(default=5.0, ge=0, description="quiet time between bursts")
    json_path: Path | None = Field(default=None, description="write the figures here")


def main(argv: list[str] | None = None) -> int:
    args = settings_from_cli(BurstSettings, argv or [], "triage bench burst")
    if args is None:
        return 2
    speeds, multiples = args.speeds, args.bursts
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="triage-burst-"))
    settings = args.model_copy(update={"workdir": workdir}).stack_settings()
    capacity = len(speeds) * (settings.max_active + QUEUE_ALLOWANCE)
    stack = Stack(settings).start()
    try:

        async def run() -> tuple[BurstReport, list[BurstReport]]:
            # warm: every replica has served, so the sidecars publish their service times
            await burst(stack, capacity, 1, args.max_tokens, retry_503=False)
            await settle(args.idle_s)
            baseline = await burst(stack, capacity, 1, args.max_tokens, retry_503=False)
            reports = []
            for multiple in multiples:
                await settle(args.idle_s)
                count = round(multiple * capacity)
                reports.append(await burst(stack, count, multiple, args.max_tokens, True))
            return baseline, reports

        baseline, reports = asyncio.run(run())
    finally:
        stack.stop()
    print(render(capacity, reports, baseline))
    for report in reports:
        print(f"{report.multiple:g}x statuses: {report.statuses}")
    if args.json_path is not None:
        payload = {
            "capacity": capacity,
            "speeds": speeds,
            "max_tokens": args.max_tokens,
            "baseline": asdict(baseline),
            "bursts": [asdict(r) for r in reports],
        }
        args.json_path.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
