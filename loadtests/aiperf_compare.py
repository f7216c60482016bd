"""An independent client on the same fleet: NVIDIA's ``aiperf`` and ``triage bench``'s own replay,
side by side, for triage with prefix affinity on and off (issue 17, item 7).

One stand-in fleet as ``triage bench compare --workload shared-prefix`` starts it (3 replicas of
speeds 1, 1, 0.5, 80 ms per token, prefill 0.8 ms per token stalling the batch, 96 KV blocks of
64 tokens each), the ``triage`` and ``triage-no-affinity`` proxies. For each strategy, twice
(caches emptied and prefix index deleted before each run):

1. **aiperf** (``scripts/aiperf_run.sh``: aiperf 0.13.0 in its own venv, tokenizer
   ``cl100k_base`` offline): streaming chat, Poisson arrivals at ``--rate``, ``--count``
   requests, a pool of ``--tenants`` prefix prompts of ``--prefix-tokens`` tokens
   (``--num-prefix-prompts`` / ``--prefix-prompt-length``), ``--own-tokens`` synthetic tokens of
   its own per request, ``max_tokens`` ``--output-tokens``;
2. **ours**: the same shape through ``loadtests/workloads.py`` (``shared-prefix``) and the
   bench's open-loop replay (``bench_drive.replay``), every request streamed.

It prints TTFT p50/p95, inter-token latency p50 and goodput from both clients. aiperf's texts
and token counts are its own (Shakespeare sentences counted by ``cl100k_base``; the stand-in
counts words and punctuation marks), so the prompts are alike in shape, not identical.

Run: ``.venv/bin/python -m loadtests.aiperf_compare [--rate 3.0 --count 180 ...]`` (``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devstack.stack import Stack
from loadtests.arrivals import ArrivalSequence
from loadtests.bench_drive import forget_caches, replay, wait_idle
from loadtests.bench_fleet import Fleet, create_key, start_strategy_proxies
from loadtests.bench_settings import BenchSettings
from loadtests.measure import bench_logging
from loadtests.report import fmt_s, summarize
from loadtests.workloads import Workload

log = logging.getLogger("triage.aiperf")
ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("triage-no-affinity", "triage")
CHAT_TEMPLATE_TOKENS = 28
"""Tokens the stand-in's chat template adds around a system and a user message and for the
answer's start (plugins/triton_provider/chat_template.py, counted by count_tokens)."""


@dataclass
class Figures:
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    goodput_rps: float
    ok: int
    errors: int


def aiperf_figures(artifacts: Path) -> Figures:
    """From aiperf's ``profile_export_aiperf.json`` (times in ms)."""
    doc = json.loads((artifacts / "profile_export_aiperf.json").read_text())

    def stat(name: str, key: str) -> float:
        metric = doc.get(name) or {}
        value = metric.get(key)
        return float(value) if value is not None else float("nan")

    count = stat("request_count", "avg")
    errors = stat("error_request_count", "avg")
    return Figures(
        ttft_p50_ms=stat("time_to_first_token", "p50"),
        ttft_p95_ms=stat("time_to_first_token", "p95"),
        itl_p50_ms=stat("inter_token_latency", "p50"),
        goodput_rps=stat("request_throughput", "avg"),
        ok=int(count) if count == count else 0,
        errors=int(errors) if errors == errors else 0,
    )


def run_aiperf(url: str, key: str, model: str, out: Path, args: argparse.Namespace) -> Figures:
    env = {
        **os.environ,
        "URL": url,
        "API_KEY": key,
        "MODEL": model,
        "OUT": str(out),
        "RATE": str(args.rate),
        "COUNT": str(args.count),
        "ISL": str(args.own_tokens),
        "OSL": str(args.output_tokens),
        "IGNORE_EOS": "0",
        "SEED": str(args.seed),
    }
    extra = [
        "--num-prefix-prompts",
        str(args.tenants),
        "--prefix-prompt-length",
        str(args.prefix_tokens),
    ]
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "aiperf_run.sh"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=args.count / args.rate + 600,
        check=False,
    )
    (out / "aiperf.stdout.txt").write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf failed ({done.returncode}): {done.stderr[-2000:]}")
    return aiperf_figures(out)


def prompt_tokens_seen(artifacts: Path) -> float | None:
    """The mean prompt tokens the stand-in counted for aiperf's requests (their usage)."""
    doc = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    value = (doc.get("usage_prompt_tokens") or {}).get("avg")
    return float(value) if value is not None else None


async def run_ours(
    url: str,
    key: str,
    model: str,
    settings: BenchSettings,
    args: argparse.Namespace,
    prompt_tokens: float | None,
) -> Figures:
    """The same shape as aiperf's run: ``args.count`` Poisson arrivals at ``args.rate``, and
    prompts as long as the stand-in counted aiperf's (``prompt_tokens``: aiperf sizes its
    texts in ``cl100k_base`` tokens, the stand-in counts words and punctuation marks)."""
    prefix = args.prefix_tokens
    if prompt_tokens is not None:  # the shared part is what remains of aiperf's prompt
        prefix = max(1, round(prompt_tokens) - args.own_tokens - CHAT_TEMPLATE_TOKENS)
    sequence = ArrivalSequence.poisson(
        rate_rps=args.rate,
        seconds=2 * args.count / args.rate,
        seed=args.seed,
        prompt=f"fixed:{args.own_tokens}",
        output=f"fixed:{args.output_tokens}",
        stream_fraction=1.0,
        workload=Workload(kind="shared-prefix", tenants=args.tenants, prefix_tokens=prefix),
    )
    sequence.arrivals = sequence.arrivals[: args.count]
    sequence.seconds = sequence.arrivals[-1].t
    log.info("ours: %d requests, a shared prefix of %d tokens", len(sequence.arrivals), prefix)
    result = await replay(sequence, [url], key, model, settings)
    s = summarize(result.records, window_s=sequence.seconds)
    return Figures(
        ttft_p50_ms=1000 * s.ttft_p50_s,
        ttft_p95_ms=1000 * s.ttft_p95_s,
        itl_p50_ms=1000 / s.tokens_per_s_p50 if s.tokens_per_s_p50 else float("nan"),
        goodput_rps=s.goodput_rps,
        ok=s.ok,
        errors=s.started - s.ok,
    )


def render(results: dict[str, dict[str, Figures]]) -> str:
    lines = [
        f"  {'strategy':<20}{'client':<8}{'TTFT p50 ms':>12}{'TTFT p95 ms':>12}"
        f"{'ITL p50 ms':>11}{'good r/s':>9}{'ok':>5}{'not ok':>7}"
    ]
    for strategy, by_client in results.items():
        for client, f in by_client.items():
            lines.append(
                f"  {strategy:<20}{client:<8}{fmt_s(f.ttft_p50_ms, 0):>12}"
                f"{fmt_s(f.ttft_p95_ms, 0):>12}{fmt_s(f.itl_p50_ms, 1):>11}"
                f"{fmt_s(f.goodput_rps):>9}{f.ok:>5}{f.errors:>7}"
            )
        if {"aiperf", "ours"} <= set(by_client):
            a, o = by_client["aiperf"], by_client["ours"]
            p50, p95 = a.ttft_p50_ms / o.ttft_p50_ms, a.ttft_p95_ms / o.ttft_p95_ms
            itl = a.itl_p50_ms / o.itl_p50_ms
            lines.append(
                f"  {'':<20}aiperf / ours: TTFT p50 {p50:.2f}x  p95 {p95:.2f}x  ITL {itl:.2f}x"
            )
    return "\n".join(lines)


async def compare(fleet: Fleet, settings: BenchSettings, args: argparse.Namespace) -> str:
    model = fleet.stack.settings.model
    results: dict[str, dict[str, Figures]] = {}
    for strategy in STRATEGIES:
        proxy = fleet.proxies[strategy][0]
        results[strategy] = {}
        for client in ("aiperf", "ours"):
            await wait_idle(fleet.stack, settings.idle_timeout_s)
            await forget_caches(fleet, settings)
            log.info("%s: %s, %d requests at %g req/s", strategy, client, args.count, args.rate)
            if client == "aiperf":
                out = args.out_dir / f"aiperf-{strategy}"
                figures = await asyncio.to_thread(
                    run_aiperf, proxy.base_url, fleet.api_key, model, out, args
                )
            else:
                seen = prompt_tokens_seen(args.out_dir / f"aiperf-{strategy}")
                figures = await run_ours(proxy.base_url, fleet.api_key, model, settings, args, seen)
            results[strategy][client] = figures
            log.info("%s %s: %s", strategy, client, figures)
    return render(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.aiperf_compare")
    parser.add_argument("--rate", type=float, default=3.0, help="requests/s (Poisson)")
    parser.add_argument("--count", type=int, default=180, help="requests per run")
    parser.add_argument("--tenants", type=int, default=12, help="prefix prompts in the pool")
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="tokens per prefix")
    parser.add_argument("--own-tokens", type=int, default=40, help="each request's own tokens")
    parser.add_argument("--output-tokens", type=int, default=25, help="max_tokens")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=Path("run/aiperf"))
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    bench_logging()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(
        workload="shared-prefix",
        strategies=list(STRATEGIES),
        stream_fraction=1.0,
        out_dir=args.out_dir,
    )
    stack = Stack(settings.stack_settings())
    fleet: Fleet | None = None
    try:
        stack.start()
        fleet = Fleet(stack, asyncio.run(create_key(stack)))
        for strategy in STRATEGIES:
            fleet.proxies[strategy] = start_strategy_proxies(stack, strategy, settings)
        text = asyncio.run(compare(fleet, settings, args))
    finally:
        if fleet is not None:
            fleet.stop()
        else:
            stack.stop()
    print(text)
    (args.out_dir / "aiperf_compare.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
