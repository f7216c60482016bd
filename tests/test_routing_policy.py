"""Table-driven unit tests of the routing policy (plugins/routing/policy.py): pure, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise
from typing import Any

import pytest

from core.keyschema import ReplicaState
from plugins.routing.policy import (
    PolicyParams,
    RequestShape,
    choose,
    effective_service_ms,
    is_fresh,
    reservation_member,
    reservation_size,
    reserved_tokens,
    score,
    scores,
    usable_cached_blocks,
    usable_session,
)

from replica_states import replica_state

NOW = 1_800_000_000_000
P = PolicyParams()


def rs(replica_id: str = "r", **overrides: Any) -> ReplicaState:
    return replica_state(replica_id, **{"ts_ms": NOW, "sample_ts_ms": NOW, **overrides})


def s(state: ReplicaState | None, inflight: int = 0, service_ms: float = 100.0) -> float:
    return score(state, inflight, service_ms, P, NOW)


# --- score -------------------------------------------------------------------------------

# (case, lower-score side, higher-score side): each side is (state, inflight, service_ms)
ORDERINGS = [
    ("more engine load scores higher", (rs(active=4), 0, 100.0), (rs(active=5), 0, 100.0)),
    ("waiting counts as load", (rs(active=4), 0, 100.0), (rs(active=4, waiting=1), 0, 100.0)),
    ("more reservations score higher", (rs(), 4, 100.0), (rs(), 5, 100.0)),
    ("slower replica loses at equal counts", (rs(), 1, 100.0), (rs(), 1, 200.0)),
    ("more slots win at equal counts", (rs(max_active=8), 4, 100.0), (rs(), 4, 100.0)),
    ("kv above threshold loses", (rs(kv_fraction=0.5), 0, 100.0), (rs(kv_fraction=0.9), 0, 100.0)),
    ("fuller kv loses more", (rs(kv_fraction=0.9), 0, 100.0), (rs(kv_fraction=1.0), 0, 100.0)),
    ("known healthy beats unknown", (rs(active=50, waiting=50), 9, 100.0), (None, 0, 100.0)),
    ("known beats stale", (rs(active=4), 0, 100.0), (rs(ts_ms=NOW - 10_000), 0, 100.0)),
    ("unknowns spread by inflight", (None, 1, 100.0), (None, 2, 100.0)),
    ("anything beats unhealthy", (None, 100, 100.0), (rs(healthy=False), 0, 100.0)),
    # speed-aware: a 2x-faster replica with 2 in flight beats a slow idle one? (3*50 < 1*200)
    ("fast busy beats slow idle", (rs(), 2, 50.0), (rs(), 0, 200.0)),
]


@pytest.mark.parametrize(
    ("lower", "higher"), [c[1:] for c in ORDERINGS], ids=[c[0] for c in ORDERINGS]
)
def test_score_orders(
    lower: tuple[ReplicaState | None, int, float], higher: tuple[ReplicaState | None, int, float]
) -> None:
    assert s(*lower) < s(*higher)


def test_below_saturation_a_request_starts_at_once() -> None:
    """With a free batch slot the expected completion time is one service time, whatever n."""
    assert {s(rs(active=a)) for a in range(4)} == {100.0}
    assert {s(rs(), inflight) for inflight in range(4)} == {100.0}
    assert s(rs(active=3)) < s(rs(active=4)) < s(rs(active=4, waiting=3))


# (case, state, inflight, service_ms, expected score)
VALUES = [
    ("idle: one service time", rs(), 0, 100.0, 100.0),
    ("a free slot: one service time", rs(active=3), 0, 100.0, 100.0),
    ("saturated: (n + 1) / C service times", rs(active=4, waiting=2), 0, 100.0, 7 * 100.0 / 4),
    ("n = inflight when it is larger", rs(active=1, waiting=1), 5, 100.0, 6 * 100.0 / 4),
    ("n = active + waiting when larger", rs(active=3, waiting=4), 5, 100.0, 8 * 100.0 / 4),
    ("kv below threshold: no penalty", rs(kv_fraction=0.5), 0, 100.0, 100.0),
    ("kv at threshold: no penalty", rs(kv_fraction=0.8), 0, 100.0, 100.0),
    ("kv full: 1 + kv_weight", rs(kv_fraction=1.0), 0, 100.0, 200.0),
    ("unknown", None, 3, 100.0, 1e9 + 3),
    ("stale", rs(ts_ms=NOW - 1001), 3, 100.0, 1e9 + 3),
    ("stale wins over unhealthy", rs(ts_ms=NOW - 1001, healthy=False), 0, 100.0, 1e9),
    ("exactly at the staleness edge is fresh", rs(ts_ms=NOW - 1000), 0, 100.0, 100.0),
    ("future ts is fresh", rs(ts_ms=NOW + 5000), 0, 100.0, 100.0),
    ("unhealthy", rs(healthy=False), 0, 100.0, math.inf),
]


@pytest.mark.parametrize(
    ("state", "inflight", "service_ms", "expected"),
    [c[1:] for c in VALUES],
    ids=[c[0] for c in VALUES],
)
def test_score_values(
    state: ReplicaState | None, inflight: int, service_ms: float, expected: float
) -> None:
    assert s(state, inflight, service_ms) == pytest.approx(expected)


def test_kv_penalty_zero_below_threshold_and_growing_above() -> None:
    below = [s(rs(kv_fraction=k)) for k in (0.0, 0.3, 0.6, 0.8)]
    assert below == [below[0]] * 4
    above = [s(rs(kv_fraction=k)) for k in (0.8, 0.85, 0.9, 0.95, 1.0)]
    assert all(a < b for a, b in pairwise(above))
    heavier = score(rs(kv_fraction=0.9), 0, 100.0, PolicyParams(kv_weight=3.0), NOW)
    assert heavier > s(rs(kv_fraction=0.9))


def test_is_fresh() -> None:
    assert is_fresh(rs(), P, NOW)
    assert not is_fresh(None, P, NOW)
    assert not is_fresh(rs(ts_ms=NOW - 5000), P, NOW)
    assert is_fresh(rs(ts_ms=NOW - 5000), PolicyParams(stale_after_ms=10_000), NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kv_threshold": 1.0},
        {"kv_threshold": -0.1},
        {"kv_weight": -1.0},
        {"stale_after_ms": -1},
        {"unknown_score": math.inf},
        {"default_service_ms": 0.0},
    ],
)
def test_params_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PolicyParams(**kwargs)


# --- effective_service_ms ----------------------------------------------------------------

SERVICE = [
    ("own when known", [rs(service_ms=10.0), rs(service_ms=30.0)], [10.0, 30.0]),
    ("mean of the known for the rest", [rs(service_ms=10.0), rs(service_ms=None)], [10.0, 10.0]),
    (
        "zero, stale and missing are not known",
        [
            rs(service_ms=10.0),
            rs(service_ms=30.0),
            rs(service_ms=0.0),
            rs(service_ms=1000.0, ts_ms=NOW - 10_000),
            None,
        ],
        [10.0, 30.0, 20.0, 20.0, 20.0],
    ),
    ("default when none known", [rs(service_ms=None), None], [20.0, 20.0]),
    ("unhealthy still informs the mean", [rs(service_ms=40.0, healthy=False), None], [40.0, 40.0]),
]


@pytest.mark.parametrize(
    ("states", "expected"), [c[1:] for c in SERVICE], ids=[c[0] for c in SERVICE]
)
def test_effective_service_ms(states: list[ReplicaState | None], expected: list[float]) -> None:
    assert effective_service_ms(states, P, NOW) == expected


# --- choose ------------------------------------------------------------------------------

CHOICES: list[tuple[str, list[tuple[str, ReplicaState | None, int]], str | None]] = [
    ("empty", [], None),
    ("least loaded", [("a", rs(active=8), 0), ("b", rs(active=4), 0), ("c", rs(active=6), 0)], "b"),
    (
        "n uses max(inflight, active + waiting)",
        [("a", rs(active=0), 6), ("b", rs(active=5), 0)],
        "b",
    ),
    (
        "a fast replica with a free slot beats an idle slow one",
        [("slow", rs(service_ms=200.0), 0), ("fast", rs(service_ms=100.0, active=3), 3)],
        "fast",
    ),
    (
        "fast replica beats slow one at equal counts",
        [("slow", rs(service_ms=200.0), 1), ("fast", rs(service_ms=100.0), 1)],
        "fast",
    ),
    (
        "slow idle replica beats a fast one with a long queue",
        [("slow", rs(service_ms=200.0), 0), ("fast", rs(service_ms=100.0, waiting=12), 0)],
        "slow",
    ),
    (
        "missing service_ms takes the mean",
        [
            ("a", rs(service_ms=None), 0),
            ("b", rs(service_ms=60.0, active=8), 0),
            ("c", rs(service_ms=140.0), 0),
        ],
        "a",  # a: 100 (the mean of 60 and 140); b: 9 / 4 * 60 = 135; c: 140
    ),
    (
        "within tie_tolerance: fewer in-flight wins over a lower score",
        [("a", rs(service_ms=100.0), 1), ("b", rs(service_ms=115.0), 0)],
        "b",  # a: 100; b: 115, within 20 % of 100, and b has fewer in flight
    ),
    (
        "outside tie_tolerance: the lower score wins",
        [("a", rs(service_ms=100.0), 0), ("b", rs(service_ms=125.0), 0)],
        "a",
    ),
    ("kv pressure loses", [("a", rs(kv_fraction=0.95), 0), ("b", rs(kv_fraction=0.2), 0)], "b"),
    ("unhealthy excluded", [("a", rs(healthy=False), 0), ("b", rs(active=4, waiting=9), 5)], "b"),
    ("all unhealthy: none", [("a", rs(healthy=False), 0), ("b", rs(healthy=False), 0)], None),
    ("unknown not preferred", [("a", None, 0), ("b", rs(active=40), 7)], "b"),
    ("stale not preferred", [("a", rs(ts_ms=NOW - 2000), 0), ("b", rs(active=40), 0)], "b"),
    ("unknown chosen when nothing else", [("a", None, 0), ("b", rs(healthy=False), 0)], "a"),
    ("unknowns spread by inflight", [("a", None, 2), ("b", None, 1), ("c", None, 3)], "b"),
    (
        "equal score: fewer inflight wins",
        # a: n = max(0, 2) = 2; b: n = max(2, 0) = 2 -> equal scores, b has more reserved
        [("b", rs(), 2), ("a", rs(active=2), 0)],
        "a",
    ),
]


@pytest.mark.parametrize(
    ("candidates", "expected"), [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES]
)
def test_choose(
    candidates: list[tuple[str, ReplicaState | None, int]], expected: str | None
) -> None:
    for tiebreak in range(4):
        assert choose(candidates, P, NOW, tiebreak) == expected


def test_near_equal_idle_replicas_share_the_load() -> None:
    """Identical replicas whose measured service times differ by noise: ties, spread."""
    candidates = [("a", rs(service_ms=101.0), 0), ("b", rs(service_ms=99.0), 0)]
    assert {choose(candidates, P, NOW, t) for t in range(4)} == {"a", "b"}
    strict = PolicyParams(tie_tolerance=0.0)
    assert {choose(candidates, strict, NOW, t) for t in range(4)} == {"b"}


def test_ties_spread_by_tiebreak_in_sorted_id_order() -> None:
    cands = [(name, rs(name), 0) for name in ("c", "a", "d", "b")]
    picked = [choose(cands, P, NOW, t) for t in range(8)]
    assert picked == ["a", "b", "c", "d", "a", "b", "c", "d"]
    # order of the candidate list does not matter, only the ids
    assert [choose(list(reversed(cands)), P, NOW, t) for t in range(8)] == picked
    assert Counter(choose(cands, P, NOW, t) for t in range(400)) == dict.fromkeys("abcd", 100)


def test_tiebreak_only_among_the_best() -> None:
    cands = [("a", rs(), 0), ("b", rs(active=5), 0), ("c", rs(), 0), ("d", rs(), 1)]
    assert {choose(cands, P, NOW, t) for t in range(10)} == {"a", "c"}


def test_deterministic() -> None:
    cands = [
        ("a", rs(active=2, service_ms=None), 1),
        ("b", rs(waiting=1, kv_fraction=0.9), 0),
        ("c", None, 0),
        ("d", rs(healthy=False), 0),
    ]
    first = [choose(cands, P, NOW, t) for t in range(20)]
    assert all([choose(cands, P, NOW, t) for t in range(20)] == first for _ in range(5))
    assert scores(cands, P, NOW) == scores(cands, P, NOW)


# --- the request's shape: a cached prompt prefix wins when idle, loses when busy enough -------

LONG = RequestShape(prompt_tokens=2000, output_tokens=50, tokens_per_block=64.0, hashes=("a",) * 30)


def test_a_replica_holding_the_prompt_wins_on_an_idle_fleet() -> None:
    cands = [("cold", rs(service_ms=20.0), 0), ("warm", rs(service_ms=20.0), 0)]
    cached = [0, 30]
    s_cold, s_warm = scores(cands, P, NOW, LONG, cached)
    # 50 iterations of 20 ms; then 2000 tokens of prefill at 0.2 ms, or the 80 not cached
    assert s_cold == 50 * 20.0 + 0.2 * 2000 and s_warm == 50 * 20.0 + 0.2 * 80
    assert {choose(cands, P, NOW, t, LONG, cached) for t in range(8)} == {"warm"}


def test_within_the_tie_tolerance_the_warm_replica_still_wins_unless_busier() -> None:
    short = RequestShape(prompt_tokens=200, output_tokens=50, tokens_per_block=64.0, hashes=("a",))
    cands = [("cold", rs(service_ms=20.0), 0), ("warm", rs(service_ms=20.0), 0)]
    assert {choose(cands, P, NOW, t, short, [0, 1]) for t in range(8)} == {"warm"}
    # the same scores, one more request in flight on the warm one: the fewest in-flight first
    cands = [("cold", rs(service_ms=20.0), 0), ("warm", rs(service_ms=20.0), 1)]
    assert {choose(cands, P, NOW, t, short, [0, 1]) for t in range(8)} == {"cold"}


def test_load_wins_over_a_cached_prompt_when_the_wait_costs_more_than_its_prefill() -> None:
    idle = ("cold", rs(service_ms=20.0), 0)
    full = ("warm", rs(service_ms=20.0, active=4, waiting=4), 0)  # 4 slots, 4 more queued
    assert {choose([idle, full], P, NOW, t, LONG, [0, 30]) for t in range(8)} == {"cold"}
    # a prompt much longer than its output: the saving outweighs that wait
    huge = RequestShape(
        prompt_tokens=2000, output_tokens=5, tokens_per_block=64.0, hashes=LONG.hashes
    )
    assert {choose([idle, full], P, NOW, t, huge, [0, 30]) for t in range(8)} == {"warm"}


def test_a_prefill_delays_the_batch_it_joins() -> None:
    """The uncached tokens cost their prefill once per request in the batch they join: a miss
    on a busy replica costs more than one on an idle replica, a hit the same."""
    shape = RequestShape(prompt_tokens=1000, output_tokens=10, tokens_per_block=50.0)
    idle, busy = rs(service_ms=20.0), rs(service_ms=20.0, active=2)  # 4 slots
    assert score(idle, 0, 20.0, P, NOW, shape, 0) == 10 * 20.0 + 0.2 * 1000
    assert score(busy, 0, 20.0, P, NOW, shape, 0) == 10 * 20.0 + 0.2 * 1000 * 3
    full = rs(service_ms=20.0, active=4, waiting=5)  # it joins a batch of C - 1 = 3 others
    assert score(full, 0, 20.0, P, NOW, shape, 20) - score(full, 0, 20.0, P, NOW, shape, 0) == (
        pytest.approx(-0.2 * 1000 * 4 + 0.2 * 1 * 4)
    )


def test_an_unknown_or_down_replica_is_credited_with_no_cache() -> None:
    stale = rs(service_ms=20.0, ts_ms=NOW - 60_000)
    cands = [("stale", stale, 0), ("down", rs(healthy=False, state="unhealthy"), 0)]
    assert usable_cached_blocks(cands, [30, 30], P, NOW) == [0, 0]


def test_without_a_shape_the_score_is_the_request_count_score() -> None:
    state = rs(service_ms=20.0, active=4, waiting=2)
    assert score(state, 0, 20.0, P, NOW) == max(1.0, 7 / 4) * 20.0
    assert score(state, 0, 20.0, P, NOW, LONG, 0) == (
        max(1.0, 7 / 4) * 20.0 * 50 + 0.2 * 2000 * 4  # the prefill delays its batch of 4
    )
    triton = rs(service_ms=300.0, source="triton")  # a request's time, not an iteration's
    assert score(triton, 0, 300.0, P, NOW, LONG, 0) == 300.0 + 0.2 * 2000


# --- reservations carry their size -------------------------------------------------------

SIZES = [
    ("call:1a2b3c4d#150", 150),
    ("abc#1", 1),
    ("a#b#40", 40),  # the last mark counts
    ("#7", 7),
    ("plain-uuid", None),  # named by an older proxy: no size
    ("abc#", None),
    ("abc#0", None),
    ("abc#12x", None),
    ("abc#-3", None),
    ("abc#1000000001", None),  # above MAX_RESERVED_SIZE
    ("abc#99999999999", None),  # too many digits
    ("abc#٣", None),  # a digit, but not an ASCII one (Lua's %d would not match it)
]


@pytest.mark.parametrize(("member", "size"), SIZES, ids=[m for m, _ in SIZES])
def test_reservation_size(member: str, size: int | None) -> None:
    assert reservation_size(member) == size


def test_a_reservation_is_named_with_its_size() -> None:
    member = reservation_member("call:1a2b3c4d", 42)
    assert member == "call:1a2b3c4d#42" and reservation_size(member) == 42
    assert member.rpartition(":")[0] == "call"  # the ticket is still found by its call id
    with pytest.raises(ValueError, match="output_tokens"):
        reservation_member("x", 0)
    assert reserved_tokens(["a#10", "b", "c#5", "d#0"], unknown_size=3) == 10 + 3 + 5 + 3


def test_few_long_requests_ahead_weigh_more_than_many_short_ones() -> None:
    """Two replicas with 2 slots each: one runs 2 requests of 500 tokens, the other holds 6 of
    10. Counting requests sends the next one to the first (2 < 6 ahead); counting tokens to the
    second, where a slot frees every 5 iterations instead of every 250."""
    shape = RequestShape(output_tokens=100)
    long_few = ("long", rs(max_active=2, service_ms=20.0), 2)
    short_many = ("short", rs(max_active=2, service_ms=20.0), 6)
    assert choose([long_few, short_many], P, NOW, 0, shape) == "long"  # sizes unknown
    assert choose([long_few, short_many], P, NOW, 0, shape, reserved=[1000, 60]) == "short"
    both = scores([long_few, short_many], P, NOW, shape, reserved=[1000, 60])
    assert both == [(100 + 1 / 2 * 500) * 20.0, (100 + 5 / 2 * 10) * 20.0]


def test_below_saturation_the_sizes_ahead_do_not_matter() -> None:
    """With a free slot the request decodes at one token per iteration whatever runs beside it."""
    shape = RequestShape(output_tokens=100)
    state = rs(max_active=8, service_ms=20.0)
    assert {score(state, 3, 20.0, P, NOW, shape, 0, r) for r in (3, 300, 30_000)} == {2000.0}


def test_with_every_request_of_one_size_the_token_score_is_the_count_score() -> None:
    for active, waiting, inflight, own in [(4, 2, 3, 50), (0, 0, 6, 7), (9, 0, 0, 1)]:
        state = rs(service_ms=20.0, active=active, waiting=waiting, max_active=4)
        shape = RequestShape(output_tokens=own)
        n = max(inflight, active + waiting)
        counted = max(1.0, (n + 1) / 4) * 20.0 * own
        sized = score(state, inflight, 20.0, P, NOW, shape, 0, inflight * own)
        assert sized == pytest.approx(counted, rel=1e-12)
        assert score(state, inflight, 20.0, P, NOW, shape) == sized  # None: of this size


def test_requests_nobody_reserved_are_taken_at_this_requests_size() -> None:
    """The replica runs 5 requests, 2 of them reserved (30 tokens in all): the other 3 are
    assumed to be as long as this one (a client beside the proxies, a lost reservation)."""
    state = rs(service_ms=10.0, active=5, max_active=2)
    shape = RequestShape(output_tokens=20)
    assert score(state, 2, 10.0, P, NOW, shape, 0, 30) == (20 + 4 / 2 * ((30 + 3 * 20) / 5)) * 10.0


# --- session affinity: the last tie rule ---------------------------------------------------

SESSION_SHAPE = RequestShape(prompt_tokens=20, output_tokens=10, session="sabc")


def test_a_replica_that_served_the_session_wins_the_ties() -> None:
    cands = [("a", rs(service_ms=20.0), 0), ("b", rs(service_ms=20.0), 0)]
    picks = {choose(cands, P, NOW, t, SESSION_SHAPE, session=[False, True]) for t in range(8)}
    assert picks == {"b"}
    assert {choose(cands, P, NOW, t, SESSION_SHAPE) for t in range(8)} == {"a", "b"}  # none


def test_the_session_gives_way_to_load_and_to_cached_blocks() -> None:
    busier = [("a", rs(service_ms=20.0), 0), ("b", rs(service_ms=20.0), 1)]
    assert choose(busier, P, NOW, 0, SESSION_SHAPE, session=[False, True]) == "a"
    warm = [("a", rs(service_ms=20.0), 0), ("b", rs(service_ms=20.0), 0)]
    shape = RequestShape(prompt_tokens=20, output_tokens=10, hashes=("x",), session="sabc")
    assert choose(warm, P, NOW, 0, shape, cached=[1, 0], session=[False, True]) == "a"
    down = [("a", rs(service_ms=20.0), 0), ("b", rs(healthy=False, state="unhealthy"), 0)]
    assert usable_session(down, [True, True], P, NOW) == [True, False]
