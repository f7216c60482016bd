"""The benchmark workloads (loadtests/workloads.py), their arrival files and the oracle that
knows every cache (loadtests/oracle.py): pure, no processes."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from loadtests.arrivals import Arrival, ArrivalSequence
from loadtests.oracle import OracleReplica, PrefixCache, replay_cache_oracle, replay_oracle
from loadtests.workloads import Workload
from plugins.triton_provider.tokens import count_tokens


def text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def test_a_tenant_shares_its_system_prompt_and_nothing_else() -> None:
    w = Workload(kind="shared-prefix", tenants=3, prefix_tokens=300)
    a, b = w.messages(1, 0, 20, seed=5, index=0), w.messages(1, 0, 20, seed=5, index=1)
    other = w.messages(2, 0, 20, seed=5, index=2)
    assert a[0] == b[0] and a[0]["role"] == "system" and count_tokens(a[0]["content"]) == 300
    assert a[1] != b[1] and count_tokens(a[1]["content"]) == 20
    assert other[0] != a[0]
    assert w.shared_tokens(0) == 300


def test_every_turn_of_a_conversation_extends_the_last() -> None:
    w = Workload(kind="multi-turn", sessions=2, turns=4, turn_tokens=10)
    turns = [w.messages(7, k, 5, seed=1, index=100 + k) for k in range(4)]
    for k in range(1, 4):
        before, now = turns[k - 1], turns[k]
        assert now[: len(before)] == before  # the last turn's whole prompt, unchanged
        assert len(now) == len(before) + 2  # its answer and a new message
        shared = sum(count_tokens(m["content"]) for m in now[:-1])
        assert shared == w.shared_tokens(k)
    assert w.messages(8, 1, 5, seed=1, index=9)[1] != turns[1][1]  # another conversation


def test_the_assigner_follows_the_workload() -> None:
    draws = 4000
    hot = Workload(kind="hot-tenant", tenants=5, hot_share=0.5).assigner(random.Random(1))
    tenants = Counter(hot()[0] for _ in range(draws))
    assert set(tenants) == set(range(5)) and abs(tenants[0] / draws - 0.5) < 0.03
    chat = Workload(kind="multi-turn", sessions=3, turns=4).assigner(random.Random(2))
    seen: dict[int, list[int]] = {}
    for _ in range(draws):
        session, turn = chat()
        seen.setdefault(session, []).append(turn)
    assert all(turns == list(range(len(turns))) for turns in seen.values())  # in order
    assert max(len(turns) for turns in seen.values()) == 4
    assert Workload().assigner(random.Random(0))() == (-1, 0)


def test_workload_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="workload must be one of"):
        Workload(kind="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hot_share"):
        Workload(kind="hot-tenant", hot_share=1.0)
    with pytest.raises(ValueError, match="2 tenants"):
        Workload(kind="hot-tenant", tenants=1)


def test_an_arrival_file_keeps_the_workload(tmp_path: Path) -> None:
    w = Workload(kind="multi-turn", sessions=4, turns=3, turn_tokens=16)
    seq = ArrivalSequence.poisson(5.0, 20.0, 3, "fixed:10", "fixed:5", 0.5, workload=w)
    again = ArrivalSequence.load(seq.save(tmp_path / "a.json"))
    assert again.workload == w and again.arrivals == seq.arrivals
    assert [again.messages(i) for i in range(5)] == [seq.messages(i) for i in range(5)]
    # an older file (4 columns, no workload) still reads: independent prompts
    doc = seq.to_json()
    doc.pop("workload")
    doc["arrivals"] = [row[:4] for row in doc["arrivals"]]
    old = ArrivalSequence.from_json(doc)
    assert old.workload == Workload() and old.arrivals[0].group == -1


def test_the_prefix_cache_forgets_the_least_recently_used() -> None:
    cache = PrefixCache(capacity_tokens=250)
    cache.use(1, 100)
    cache.use(2, 100)
    assert cache.hit(1, 100) == 100  # a hit does not count as a use: only serving does
    cache.use(1, 120)  # a longer prefix of group 1 (a conversation grew)
    cache.use(3, 100)  # over 250: group 2, the least recently used, goes
    assert (cache.hit(2, 100), cache.hit(1, 200), cache.hit(3, 50)) == (0, 120, 50)


def test_the_cache_oracle_sends_a_tenant_where_its_prompt_is_cached() -> None:
    w = Workload(kind="shared-prefix", tenants=2, prefix_tokens=1000)
    replicas = [OracleReplica(f"r{i}", 4, 0.01, 0.001, 5000) for i in range(2)]
    arrivals = [
        Arrival(t=float(i), prompt_tokens=10, max_tokens=10, stream=True, group=0) for i in range(4)
    ]
    records = replay_cache_oracle(arrivals, replicas, w)
    assert {r.replica for r in records} == {"r0"}  # the first warmed r0; the rest follow it
    assert [r.cached_tokens for r in records] == [0, 1000, 1000, 1000]
    assert records[0].latency_s == pytest.approx(1010 * 0.001 + 10 * 0.01)
    assert records[1].latency_s == pytest.approx(10 * 0.001 + 10 * 0.01)
    # the processor-sharing oracle charges the same prefills where its choice lands
    ps = replay_oracle(arrivals, replicas, 10.0, w)
    assert ps[0].cached_tokens == 0 and ps[0].latency_s == records[0].latency_s
