"""The fair order of the admission gate's queue (``plugins/admission/rules.py``), pure: start-time
fair queueing between flows within a tier, strict priority between tiers, push-out of a bigger
flow's last place when the queue is full, and the per-flow cap. ``gate.lua`` decides alike
(``tests/test_gate_parity.py``)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.admission import rules
from plugins.admission.rules import FlowCall, GateParams, GateView, ReplicaLoad, Status

from replica_states import replica_state

NOW = 1_000_000


def full_fleet(slots: int = 1) -> list[ReplicaLoad]:
    """One replica whose batch slots are all reserved: nothing is granted, nobody admitted."""
    return [ReplicaLoad(replica_state("r", NOW, max_active=slots), reservations=slots)]


def free_fleet(slots: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(replica_state("r", NOW, max_active=slots), reservations=0)]


def params(max_queue: int = 100, **changes: object) -> GateParams:
    base = {
        "allowance": 0,
        "unknown_slots": 0,
        "stale_after_ms": 1000,
        "queue_limit": max_queue,
        "max_queue": max_queue,
    }
    return GateParams(**{**base, **changes})  # type: ignore[arg-type]


def busy_view(outstanding: int = 1) -> GateView:
    return GateView(admitted={f"running-{i}" for i in range(outstanding)})


def enter(
    view: GateView,
    ticket: str,
    flow: str,
    *,
    priority: int = 1,
    weight: float = 1.0,
    cost: float = 100.0,
    p: GateParams | None = None,
    replicas: list[ReplicaLoad] | None = None,
) -> rules.Decision:
    return rules.gate_call(
        view,
        "enter",
        ticket,
        priority,
        full_fleet() if replicas is None else replicas,
        p or params(),
        NOW,
        FlowCall(flow, weight, cost),
    )


def order(view: GateView) -> list[str]:
    return [q.ticket for q in view.queue]


def grant_all(view: GateView, slots: int, p: GateParams | None = None) -> list[str]:
    """Free ``slots`` batch slots one at a time (a release each) and return the grant order."""
    granted: list[str] = []
    while view.queue:
        view.admitted.clear()
        decision = rules.gate_call(view, "peek", "", 9, free_fleet(slots), p or params(), NOW)
        granted += decision.granted
    return granted


# -- the order -------------------------------------------------------------------------------


def test_a_steady_request_goes_ahead_of_a_flood_that_came_first() -> None:
    """A flood of 10 from one flow, then one request from another: it is second in line (one
    flood request has the same start tag and an earlier ticket), not eleventh as in FIFO."""
    view = busy_view()
    for i in range(10):
        assert enter(view, f"flood-{i:02d}", "key:flood").status == Status.WAITING
    decision = enter(view, "steady-0", "key:steady")
    assert decision.status == Status.WAITING
    assert decision.ahead == 0
    assert order(view)[:3] == ["flood-00", "steady-0", "flood-01"]


def test_backlogged_flows_alternate_in_proportion_to_their_weights() -> None:
    """Two flows, each with 12 queued: weight 2 is served twice as often as weight 1."""
    view = busy_view()
    for i in range(12):
        enter(view, f"a-{i:02d}", "tenant:a", weight=2.0)
        enter(view, f"b-{i:02d}", "tenant:b", weight=1.0)
    first = order(view)[:12]
    counts = Counter(t.split("-")[0] for t in first)
    assert counts == {"a": 8, "b": 4}, first


def test_work_counts_in_tokens_not_requests() -> None:
    """A flow of 1000-token requests and one of 100-token requests, both backlogged: the short
    one's requests come about ten times as often."""
    view = busy_view()
    for i in range(20):
        enter(view, f"long-{i:02d}", "key:long", cost=1000.0)
        enter(view, f"short-{i:02d}", "key:short", cost=100.0)
    first = order(view)[:12]
    assert Counter(t.split("-")[0] for t in first) == {"long": 2, "short": 10}, first


def test_an_idle_flow_banks_no_credit_and_a_busy_one_is_not_punished() -> None:
    """Flow A is served alone for a while (its tags run up); flow B returns after idling: B
    starts at the virtual time (where A's service has reached), not at 0 (which would put all
    of B's burst ahead of A's queue) and not behind A's whole backlog."""
    view = busy_view()
    for i in range(20):
        enter(view, f"a-{i:02d}", "key:a")
    granted = []
    for _ in range(10):  # ten of A's are served
        view.admitted.clear()
        granted += rules.gate_call(view, "peek", "", 9, free_fleet(1), params(), NOW).granted
        view.admitted.add("running")
    assert granted == [f"a-{i:02d}" for i in range(10)]
    for i in range(6):
        enter(view, f"b-{i}", "key:b")
    queue = order(view)
    # B's burst interleaves with the rest of A's backlog from where service is now: its first
    # tag is the virtual time (a-09's), one request before a-10's
    assert queue[:5] == ["b-0", "a-10", "b-1", "a-11", "b-2"], queue
    assert queue[-1] == "a-19"  # not all of B's burst ahead of A's queue


def test_the_tags_start_again_when_a_request_finds_the_queue_empty() -> None:
    view = busy_view()
    for i in range(5):
        enter(view, f"a-{i}", "key:a")
    grant_all(view, 1)
    assert view.fair.finish  # the state of the contention that ended
    decision = enter(view, "b-0", "key:b")
    assert decision.status == Status.WAITING
    assert view.queue[0].score == rules.queue_score(1, 0.0)  # fresh tags
    assert view.fair.finish == {(1, "key:b"): 100.0}


def test_strict_priority_between_tiers_whatever_the_fair_order() -> None:
    view = busy_view()
    for i in range(5):
        enter(view, f"low-{i}", "key:a", priority=2)
    enter(view, "high-0", "key:a", priority=0)  # the same flow, a better tier
    assert order(view)[0] == "high-0"


def test_admitted_at_once_when_nobody_is_ahead_in_the_fair_order() -> None:
    """A slot in the allowance is free, but a flood is queued for a batch slot: a request
    whose start tag is below every queued one goes in; the flood's next does not."""
    view = GateView()
    replicas = [ReplicaLoad(replica_state("r", NOW, max_active=1), reservations=1)]
    p = params(allowance=2)
    assert enter(view, "flood-0", "key:flood", replicas=replicas, p=p).status == Status.ADMITTED
    for i in range(1, 4):  # capacity 1 + 2 allowance, but every batch slot is reserved
        enter(view, f"flood-{i}", "key:flood", replicas=replicas, p=p)
    assert len(view.admitted) == 3 and order(view) == ["flood-3"]
    # the steady flow's first request starts at the virtual time: nobody is ahead of it
    view.admitted.discard("flood-1")
    assert enter(view, "steady", "key:steady", replicas=replicas, p=p).status == Status.ADMITTED


# -- a full queue, the per-flow cap ----------------------------------------------------------


def test_a_full_queue_gives_the_floods_last_place_to_another_flow() -> None:
    view = busy_view()
    p = params(max_queue=6)
    for i in range(6):
        assert enter(view, f"flood-{i}", "key:flood", p=p).status == Status.WAITING
    assert enter(view, "flood-6", "key:flood", p=p).status == Status.QUEUE_FULL
    decision = enter(view, "steady-0", "key:steady", p=p)
    assert decision.status == Status.WAITING
    assert "flood-5" not in order(view) and "steady-0" in order(view)
    assert len(view.queue) == 6
    # the flood cannot take it back: its next request comes after the steady one
    assert enter(view, "flood-7", "key:flood", p=p).status == Status.QUEUE_FULL


def test_flows_of_equal_backlog_do_not_take_places_from_each_other() -> None:
    view = busy_view()
    p = params(max_queue=4)
    for i in range(2):
        enter(view, f"a-{i}", "key:a", p=p)
        enter(view, f"b-{i}", "key:b", p=p)
    # a's next would leave a holding 3 and b 1: it takes no place from b (2 is not > 2 + 1)
    assert enter(view, "a-2", "key:a", p=p).status == Status.QUEUE_FULL
    assert order(view) == ["a-0", "b-0", "a-1", "b-1"]


def test_a_full_tier_pushes_out_within_the_tier_only() -> None:
    view = busy_view()
    p = params(max_queue=10, queue_limit=3)
    enter(view, "other-tier", "key:flood", priority=2, p=p)
    for i in range(3):
        enter(view, f"flood-{i}", "key:flood", p=p)
    assert enter(view, "steady", "key:steady", p=p).status == Status.WAITING
    assert order(view) == ["flood-0", "steady", "flood-1", "other-tier"]


def test_the_per_flow_cap() -> None:
    view = busy_view()
    p = params(max_queue=10, flow_limit=2)
    assert [enter(view, f"a-{i}", "key:a", p=p).status for i in range(3)] == [
        Status.WAITING,
        Status.WAITING,
        Status.FLOW_FULL,
    ]
    assert enter(view, "b-0", "key:b", p=p).status == Status.WAITING


# -- the fairness bound ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=2, max_size=4),
    costs=st.lists(st.sampled_from([10.0, 100.0, 1000.0]), min_size=2, max_size=4),
    backlog=st.integers(5, 30),
)
def test_backlogged_flows_get_their_weighted_share_of_tokens(
    weights: list[float], costs: list[float], backlog: int
) -> None:
    """Every flow backlogged (the same number of requests queued, each flow its own request
    size): over any prefix of the grant order in which every flow still has requests queued,
    each flow's tokens / weight differ by at most the largest cost / weight (start-time fair
    queueing's bound)."""
    flows = list(range(min(len(weights), len(costs))))
    view = busy_view()
    for i in range(backlog):
        for f in flows:
            enter(view, f"f{f}-{i:03d}", f"key:{f}", weight=weights[f], cost=costs[f])
    served = dict.fromkeys(flows, 0.0)
    left = Counter(int(q.ticket[1 : q.ticket.index("-")]) for q in view.queue)
    bound = max(costs[f] / weights[f] for f in flows)
    for q in list(view.queue):
        f = int(q.ticket[1 : q.ticket.index("-")])
        served[f] += costs[f] / weights[f]
        left[f] -= 1
        if any(left[g] == 0 for g in flows):
            break
        normalized = list(served.values())
        assert max(normalized) - min(normalized) <= bound + 1e-6, (served, bound)


def test_a_release_corrects_the_charge_by_the_tokens_used() -> None:
    """Charged its max_tokens (1000) at entry, a request that used 100 gives its flow back the
    difference: the flow's next request is not held back for tokens it never received."""
    view = busy_view()
    enter(view, "a-0", "key:a", cost=1000.0)
    enter(view, "b-0", "key:b", cost=1000.0)
    view.admitted.add("a-0")
    view.queue = [q for q in view.queue if q.ticket != "a-0"]
    assert view.fair.finish[(1, "key:a")] == 1000.0
    rules.gate_call(
        view,
        "release",
        "a-0",
        1,
        full_fleet(),
        params(),
        NOW,
        FlowCall("key:a", 2.0, 1000.0),
        100.0,
    )
    assert view.fair.finish[(1, "key:a")] == 1000.0 + (100.0 - 1000.0) / 2.0
    # after the tags restarted there is nothing to correct
    fresh = busy_view()
    rules.gate_call(
        fresh, "release", "x", 1, full_fleet(), params(), NOW, FlowCall("key:a", 1.0, 10.0), 5.0
    )
    assert fresh.fair.finish == {}
