"""The end-of-run report of a load run: one record per logical request, the figures, the plots.

Shared by the Locust files and ``triage bench``. Pure (plots through matplotlib's Agg backend,
imported lazily); no Locust, no LiteLLM.

Outcomes of a logical request (its retries included):

* ``ok``: 200 and a complete answer (a completion; a stream that ended with ``[DONE]``);
* ``shed``: the final answer was 503 or 429 with the OpenAI error envelope (the gateway said
  "not now", normally with ``Retry-After``);
* ``error``: any other answer carrying the OpenAI error envelope (also an error event inside a
  stream);
* ``cut``: still running (or waiting to retry) when the load generator stopped its users at
  the run's end, drain included: the run cut it, not the stack (a longer drain lets it finish);
* ``lost``: no answer with a body: a transport error, a timeout, a malformed or truncated answer,
  or a request that started and never got a record (``started`` minus the records counts those:
  a worker that died). Must be 0.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loadtests.measure import jsonable, percentile

if TYPE_CHECKING:
    from loadtests.traffic import Attempt

Outcome = Literal["ok", "shed", "error", "cut", "lost"]
ANSWERED: frozenset[str] = frozenset({"ok", "shed", "error"})


@dataclass(slots=True)
class Record:
    """One logical request. Times in seconds; ``t`` is its start on a clock shared by the run
    (epoch seconds for Locust, seconds from the run's start for ``triage bench``)."""

    t: float
    latency_s: float
    """Start to the final answer (or failure), Retry-After waits and retries included."""
    outcome: Outcome
    status: int = 0
    """HTTP status of the final answer; 0 when there was none."""
    replica: str | None = None
    """``x-litellm-model-id`` of the answer."""
    ttft_s: float | None = None
    """Start to the first content token (streams)."""
    tokens: int = 0
    """Output tokens received (usage, else content chunks)."""
    stream: bool = False
    retries: int = 0
    tier: str = ""
    retry_after_s: float | None = None
    """The Retry-After of the final 503/429, when it carried one."""
    detail: str = ""
    """Error code / kind, for the report."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the replica had in its KV cache (the answer's usage)."""

    @classmethod
    def of(
        cls,
        got: Attempt,
        t: float,
        latency_s: float,
        stream: bool,
        retries: int = 0,
        tier: str = "",
    ) -> Record:
        """The record of a request whose final attempt answered ``got``."""
        return cls(
            t=t,
            latency_s=latency_s,
            outcome=got.outcome,
            status=got.status,
            replica=got.replica,
            ttft_s=got.ttft_s,
            tokens=got.tokens,
            stream=stream,
            retries=retries,
            tier=tier,
            retry_after_s=got.retry_after_s,
            detail=got.detail,
            prompt_tokens=got.prompt_tokens,
            cached_tokens=got.cached_tokens,
        )

    def row(self) -> list[Any]:
        """Compact form for transport (Locust worker -> master) and files."""
        return list(astuple(self))

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        return cls(*row)

    @property
    def end(self) -> float:
        return self.t + self.latency_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of streaming (a stream's decode rate)."""
        if not self.stream or self.ttft_s is None or self.tokens < 2:
            return None
        span = self.latency_s - self.ttft_s
        return (self.tokens - 1) / span if span > 0 else None


RECORD_FIELDS = [f.name for f in fields(Record)]


def cached_share(records: Sequence[Record]) -> float | None:
    """The share of the records' prompt tokens their replicas had cached (None: none known)."""
    prompt = sum(r.prompt_tokens for r in records)
    return sum(r.cached_tokens for r in records) / prompt if prompt > 0 else None


SPREAD = ("p50", "p95", "p99", "max")


def _spread(name: str, values: Sequence[float]) -> dict[str, float]:
    qs = (percentile(values, 50), percentile(values, 95), percentile(values, 99))
    return {
        f"{name}_{k}_s": v
        for k, v in zip(SPREAD, (*qs, max(values, default=float("nan"))), strict=True)
    }


@dataclass(slots=True, kw_only=True)
class TierFigures:
    requests: int
    ok: int
    shed_share: float
    p95_s: float


@dataclass(slots=True, kw_only=True)
class Summary:
    """The figures of one run (``summarize``). Latency spreads are over successes, ``answer_*``
    over every answered request; ``p50_s``/``p95_s``/``p99_s`` name the latency's."""

    started: int
    answered: int
    ok: int
    shed: int
    errors: int
    lost: int
    """Failed (``lost_failed``) + started without a record (``lost_unanswered``)."""
    cut: int
    lost_unanswered: int
    lost_failed: int
    shed_share: float
    shed_with_retry_after: int
    error_share: float
    retries: int
    retried_requests: int
    offered_rps: float
    goodput_rps: float
    goodput_tokens_per_s: float
    span_s: float
    streams: int
    share: dict[str, float]
    """Successes per replica id, as a share of all successes."""
    unknown_replica: int
    detail: dict[str, int]
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_max_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    ttft_max_s: float
    answer_p50_s: float
    answer_p95_s: float
    answer_p99_s: float
    answer_max_s: float
    tokens_per_s_p50: float
    tokens_per_s_p05: float
    answer_bound_s: float | None = None
    answered_within_bound_share: float | None = None
    tiers: dict[str, TierFigures] = field(default_factory=dict)
    late_arrivals: int = 0
    """Locust: arrivals that left late (the user's previous request was still running)."""
    cached_share: float | None = None
    """Of the successes' prompt tokens, the share the replicas had in their KV cache (None: no
    answer reported its prompt tokens)."""

    @property
    def p50_s(self) -> float:
        return self.latency_p50_s

    @property
    def p95_s(self) -> float:
        return self.latency_p95_s

    @property
    def p99_s(self) -> float:
        return self.latency_p99_s

    def as_json(self) -> dict[str, Any]:
        """Strict-JSON form (NaN as null), with the ``p50_s``/``p95_s``/``p99_s`` aliases."""
        out = asdict(self)
        out.update(p50_s=self.p50_s, p95_s=self.p95_s, p99_s=self.p99_s)
        return jsonable(out)


def summarize(
    records: Sequence[Record],
    started: int | None = None,
    replica_ids: Sequence[str] = (),
    window_s: float | None = None,
    answer_bound_s: float | None = None,
) -> Summary:
    """The run's figures.

    ``started``: logical requests begun (default: the records); those without a record are lost.
    ``window_s``: the arrival window, for the offered rate (default: first to last start).
    ``answer_bound_s``: report the share answered (any outcome but lost) within this time.
    Goodput = successes (and their tokens) per second from the first start to the last success.
    """
    n_started = len(records) if started is None else started
    by_outcome = Counter(r.outcome for r in records)
    ok = [r for r in records if r.outcome == "ok"]
    answered = [r for r in records if r.outcome in ANSWERED]
    unanswered = max(0, n_started - len(records))
    tps = [v for r in ok if (v := r.decode_tokens_per_s) is not None]
    first = min((r.t for r in records), default=0.0)
    span = max((r.end for r in ok), default=first) - first
    starts = [r.t for r in records]
    window = window_s if window_s is not None else (max(starts) - first if starts else 0.0)
    picks = Counter(r.replica or "?" for r in ok)
    ids = list(replica_ids) or sorted(picks)
    shed = [r for r in records if r.outcome == "shed"]
    tiers: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        tiers[r.tier or "-"].append(r)
    within = sum(
        1 for r in answered if answer_bound_s is not None and r.latency_s <= answer_bound_s
    )
    return Summary(
        started=n_started,
        answered=len(answered),
        ok=len(ok),
        shed=len(shed),
        errors=by_outcome["error"],
        lost=by_outcome["lost"] + unanswered,
        cut=by_outcome["cut"],
        lost_unanswered=unanswered,
        lost_failed=by_outcome["lost"],
        shed_share=len(shed) / n_started if n_started else 0.0,
        shed_with_retry_after=sum(1 for r in shed if r.retry_after_s is not None),
        error_share=by_outcome["error"] / n_started if n_started else 0.0,
        retries=sum(r.retries for r in records),
        retried_requests=sum(1 for r in records if r.retries),
        offered_rps=n_started / window if window > 0 else float("nan"),
        goodput_rps=len(ok) / span if span > 0 else float("nan"),
        goodput_tokens_per_s=sum(r.tokens for r in ok) / span if span > 0 else float("nan"),
        cached_share=cached_share(ok),
        span_s=span,
        streams=sum(1 for r in ok if r.stream),
        share={rid: picks.get(rid, 0) / len(ok) if ok else 0.0 for rid in ids},
        unknown_replica=sum(n for rid, n in picks.items() if rid not in ids),
        detail=dict(Counter(r.detail for r in records if r.outcome != "ok" and r.detail)),
        **_spread("latency", [r.latency_s for r in ok]),
        **_spread("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
        **_spread("answer", [r.latency_s for r in answered]),
        tokens_per_s_p50=percentile(tps, 50),
        tokens_per_s_p05=percentile(tps, 5) if len(tps) >= 2 else float("nan"),
        answer_bound_s=answer_bound_s,
        answered_within_bound_share=(
            None if answer_bound_s is None else within / n_started if n_started else 1.0
        ),
        tiers={
            tier: TierFigures(
                requests=len(rs),
                ok=sum(1 for r in rs if r.outcome == "ok"),
                shed_share=sum(1 for r in rs if r.outcome == "shed") / len(rs),
                p95_s=percentile([r.latency_s for r in rs if r.outcome == "ok"], 95),
            )
            for tier, rs in sorted(tiers.items())
        }
        if len(tiers) > 1 or "-" not in tiers
        else {},
    )


def fmt_s(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def render_text(s: Summary, title: str = "load run") -> str:
    """A human-readable block of the summary (what the run prints at its end)."""
    lines = [
        f"== {title} ==",
        f"requests  started {s.started}  ok {s.ok}  503/429 {s.shed} "
        f"({100 * s.shed_share:.1f} %)  errors {s.errors}  LOST {s.lost}"
        + (f" (failed {s.lost_failed}, unanswered {s.lost_unanswered})" if s.lost else "")
        + (
            f"  cut by the run's end {s.cut} (still running when it stopped: a longer "
            "--drain-s lets them finish)"
            if s.cut
            else ""
        ),
        f"offered   {fmt_s(s.offered_rps)} req/s   goodput {fmt_s(s.goodput_rps)} req/s, "
        f"{fmt_s(s.goodput_tokens_per_s, 1)} tokens/s   retries {s.retries} "
        f"(on {s.retried_requests} requests)",
        f"latency   p50 {fmt_s(s.latency_p50_s)} s  p95 {fmt_s(s.latency_p95_s)} s  "
        f"p99 {fmt_s(s.latency_p99_s)} s  max {fmt_s(s.latency_max_s)} s  (successes)",
        f"TTFT      p50 {fmt_s(s.ttft_p50_s, 3)} s  p95 {fmt_s(s.ttft_p95_s, 3)} s  "
        f"p99 {fmt_s(s.ttft_p99_s, 3)} s  ({s.streams} streams; decode "
        f"{fmt_s(s.tokens_per_s_p50, 1)} tokens/s p50)",
        "share     " + "  ".join(f"{rid} {100 * share:.1f} %" for rid, share in s.share.items()),
    ]
    if s.cached_share is not None:
        lines.append(
            f"cached    {100 * s.cached_share:.1f} % of the successes' prompt tokens were in "
            "their replica's KV cache (usage.prompt_tokens_details.cached_tokens)"
        )
    if s.answered_within_bound_share is not None and s.answer_bound_s is not None:
        lines.append(
            f"answered within {s.answer_bound_s:.1f} s: "
            f"{100 * s.answered_within_bound_share:.1f} % of started"
        )
    for tier, t in s.tiers.items():
        lines.append(
            f"tier {tier:<10} requests {t.requests}  ok {t.ok}  "
            f"503 {100 * t.shed_share:.1f} %  p95 {fmt_s(t.p95_s)} s"
        )
    if s.detail:
        lines.append(f"not ok by kind: {s.detail}")
    if s.late_arrivals:
        lines.append(
            f"note: {s.late_arrivals} arrivals came late (a user's previous request was still "
            "running): a lower --user-rps (more users) keeps the arrivals open-loop"
        )
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rolling_quantile(
    points: Iterable[tuple[float, float]], bin_s: float, q: float
) -> list[tuple[float, float]]:
    """(bin middle, q-percentile) of (time, value) points per ``bin_s`` bin, bins with data."""
    bins: dict[int, list[float]] = defaultdict(list)
    for t, v in points:
        bins[math.floor(t / bin_s)].append(v)
    return [((b + 0.5) * bin_s, percentile(vs, q)) for b, vs in sorted(bins.items())]


def per_replica_rate(
    records: Sequence[Record], t0: float, bin_s: float, replica_ids: Sequence[str]
) -> tuple[list[float], dict[str, list[float]]]:
    """Successful completions per second per replica, in ``bin_s`` bins by completion time."""
    ok = [r for r in records if r.outcome == "ok"]
    if not ok:
        return [], {rid: [] for rid in replica_ids}
    last = max(r.end for r in ok) - t0
    n_bins = max(1, math.ceil(last / bin_s))
    counts = {rid: [0.0] * n_bins for rid in replica_ids}
    for r in ok:
        rid = r.replica or "?"
        series = counts.setdefault(rid, [0.0] * n_bins)
        series[min(n_bins - 1, int((r.end - t0) / bin_s))] += 1 / bin_s
    return [(i + 0.5) * bin_s for i in range(n_bins)], counts


def plot_runs(
    runs: Mapping[str, Sequence[Record]],
    out_dir: Path,
    replica_ids: Sequence[str] = (),
    t0: Mapping[str, float] | None = None,
    events: Sequence[tuple[float, str]] = (),
    title: str = "",
    bin_s: float = 2.0,
    prefix: str = "",
) -> list[Path]:
    """Two PNGs in ``out_dir`` for one or more runs (one row of axes per run): latency over time
    (``<prefix>latency.png``: successes' latency and TTFT by start time, rolling p95, 503s) and
    per-replica load (``<prefix>replicas.png``: completions/s per replica, stacked).
    ``events``: (time, label) marks, e.g. a replica killed."""
    plt = _pyplot()
    names = list(runs)
    starts = {
        name: (t0 or {}).get(name, min((r.t for r in rs), default=0.0)) for name, rs in runs.items()
    }
    paths = [out_dir / f"{prefix}latency.png", out_dir / f"{prefix}replicas.png"]
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        rs, base = runs[name], starts[name]
        ok = [r for r in rs if r.outcome == "ok"]
        ax.scatter(
            [r.t - base for r in ok], [r.latency_s for r in ok], s=6, alpha=0.5, label="latency"
        )
        ttft = [(r.t - base, r.ttft_s) for r in ok if r.ttft_s is not None]
        if ttft:
            ax.scatter(*zip(*ttft, strict=True), s=6, alpha=0.5, marker="^", label="TTFT")
        roll = rolling_quantile(((r.t - base, r.latency_s) for r in ok), bin_s * 2.5, 95)
        if roll:
            ax.plot(*zip(*roll, strict=True), color="black", lw=1.2, label="p95 (rolling)")
        shed = [r for r in rs if r.outcome == "shed"]
        if shed:
            ax.scatter(
                [r.t - base for r in shed],
                [r.latency_s for r in shed],
                s=10,
                marker="x",
                color="red",
                label="503/429 (time to answer)",
            )
        for t, label in events:
            ax.axvline(t, color="grey", ls="--", lw=1)
            ax.annotate(label, (t, 0), xytext=(3, 3), textcoords="offset points", fontsize=8)
        ax.set_title(f"{title} {name}".strip(), fontsize=10)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("request start, s from the run's start")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        x, series = per_replica_rate(runs[name], starts[name], bin_s, replica_ids)
        if x:
            labels = list(series)
            ax.stackplot(x, *[series[k] for k in labels], labels=labels, alpha=0.8)
        for t, _label in events:
            ax.axvline(t, color="grey", ls="--", lw=1)
        ax.set_title(f"{title} {name}: completions/s per replica".strip(), fontsize=10)
        ax.set_ylabel("req/s")
        ax.grid(alpha=0.3)
        if x:
            ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("completion time, s from the run's start")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths
