"""The stand-in engine's paged KV cache with prefix reuse
(``triton_models/cpu_standin/tensorrt_llm/1/kv_cache.py``): chained block hashes, shared
blocks, reuse of a cached prefix, LRU eviction of unheld blocks (a prefix's end first), and the
block counts the metrics export."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.paths import REPO_ROOT

_PATH = REPO_ROOT / "triton_models" / "cpu_standin" / "tensorrt_llm" / "1" / "kv_cache.py"
_spec = importlib.util.spec_from_file_location("standin_kv_cache", _PATH)
assert _spec and _spec.loader
kv_cache = importlib.util.module_from_spec(_spec)
sys.modules["standin_kv_cache"] = kv_cache
_spec.loader.exec_module(kv_cache)

TPB = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_block_hashes_are_chained_over_full_blocks() -> None:
    a = kv_cache.block_hashes(tokens(10), TPB)
    assert len(a) == 2  # 10 tokens: two full blocks, the partial third has no hash
    b = kv_cache.block_hashes([*tokens(8), 99, 98], TPB)
    assert a == b  # the tokens after the full blocks do not matter
    c = kv_cache.block_hashes([7, *tokens(7, 1)], TPB)
    assert c[0] != a[0] and c[1] != a[1]  # block 1 is the same tokens but its prefix differs
    assert all(len(h) == kv_cache.HASH_BYTES for h in a)


def test_a_repeated_prompt_reuses_its_blocks_and_prefills_only_the_rest() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB)
    prompt = tokens(10)
    hashes = kv_cache.block_hashes(prompt, TPB)
    first, cached = cache.admit(hashes, len(prompt))
    assert cached == 0 and first.blocks == 3 and cache.used == 3
    cache.release(first, hashes)
    assert cache.used == 0 and cache.free == 16 and cache.cached_blocks == 2
    second, cached = cache.admit(hashes, len(prompt))
    assert cached == 8 and second.cached == hashes and second.own == 1
    assert cache.reused_blocks == 2 and cache.missed_blocks == 2


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB)
    prompt = tokens(8)
    hashes = kv_cache.block_hashes(prompt, TPB)
    holding, _ = cache.admit(hashes, len(prompt))
    cache.release(holding, hashes)
    _, cached = cache.admit(hashes, len(prompt))
    assert cached == 7


def test_running_sequences_share_a_cached_block_and_count_it_once() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB)
    shared = tokens(8)
    first_hashes = kv_cache.block_hashes([*shared, 50, 51], TPB)
    first, _ = cache.admit(first_hashes, 10)
    cache.release(first, first_hashes)
    a, _ = cache.admit(kv_cache.block_hashes([*shared, 60], TPB), 9)
    b, _ = cache.admit(kv_cache.block_hashes([*shared, 70], TPB), 9)
    assert a.cached == b.cached == first_hashes[:2]
    assert cache.used == 2 + a.own + b.own  # the two shared blocks once
    cache.release(a, kv_cache.block_hashes([*shared, 60], TPB))
    assert first_hashes[0] in cache.references  # b still holds them
    cache.release(b, kv_cache.block_hashes([*shared, 70], TPB))
    assert cache.used == 0 and not cache.references


def test_a_prompt_is_reusable_from_the_end_of_its_context_iteration_on() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB)
    prompt = tokens(10)
    hashes = kv_cache.block_hashes(prompt, TPB)
    running, _ = cache.admit(hashes, len(prompt))
    assert cache.cached_prefix(hashes) == 0  # not before its prefill is done
    cache.store(running, hashes)
    assert running.cached == hashes and running.own == 1 and cache.used == 3
    other, cached = cache.admit(hashes, len(prompt))  # arrives while the first one runs
    assert cached == 8 and cache.used == 4  # the two full blocks shared
    twin_hashes = kv_cache.block_hashes(tokens(9, 70), TPB)
    twin, _ = cache.admit(twin_hashes, 9)
    again, _ = cache.admit(twin_hashes, 9)  # in the same iteration: nothing to reuse yet
    cache.store(twin, twin_hashes)
    cache.store(again, twin_hashes)  # stored by the twin: it keeps its own copies
    assert twin.cached == twin_hashes and again.cached == [] and again.own == 3
    for holding, seq in ((running, prompt), (other, prompt), (twin, tokens(9, 70))):
        cache.release(holding, kv_cache.block_hashes(seq, TPB))
    cache.release(again, kv_cache.block_hashes(tokens(9, 70), TPB))
    assert cache.used == 0 and cache.cached_blocks == 4


def test_generated_tokens_are_cached_for_the_next_turn() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB)
    turn1 = tokens(6)
    answer = tokens(6, 100)
    holding, _ = cache.admit(kv_cache.block_hashes(turn1, TPB), len(turn1))
    assert cache.grow(holding, len(turn1) + len(answer))
    cache.release(holding, kv_cache.block_hashes(turn1 + answer, TPB))
    turn2 = turn1 + answer + tokens(5, 200)
    _, cached = cache.admit(kv_cache.block_hashes(turn2, TPB), len(turn2))
    assert cached == 12  # the first turn and its answer: three full blocks


def test_unheld_blocks_are_evicted_least_recently_used_and_a_prefix_end_first() -> None:
    cache = kv_cache.PagedKVCache(capacity=6, tokens_per_block=TPB)
    old = kv_cache.block_hashes(tokens(8), TPB)
    recent = kv_cache.block_hashes(tokens(8, 50), TPB)
    for hashes in (old, recent):
        holding, _ = cache.admit(hashes, 8)
        cache.release(holding, hashes)
    assert cache.cached_blocks == 4 and cache.free == 6
    # 4 new blocks: 2 empty, then the old prompt's last block, then its first
    holding, _ = cache.admit(kv_cache.block_hashes(tokens(12, 900), TPB), 15)
    assert holding.own == 4
    assert cache.cached_prefix(old) == 0 and cache.cached_prefix(recent) == 2
    # one more: the recent prompt's end goes, its start stays usable
    assert cache.grow(holding, 19)
    assert cache.cached_prefix(recent) == 1


def test_a_prompt_that_does_not_fit_changes_nothing() -> None:
    cache = kv_cache.PagedKVCache(capacity=4, tokens_per_block=TPB)
    running, _ = cache.admit(kv_cache.block_hashes(tokens(8), TPB), 8)  # 3 blocks
    before = (cache.used, cache.free, dict(cache.references), list(cache.evictable))
    assert cache.admit(kv_cache.block_hashes(tokens(8, 30), TPB), 8) is None
    assert (cache.used, cache.free, dict(cache.references), list(cache.evictable)) == before
    assert cache.grow(running, 12) is True  # 12 tokens and the next: the fourth block
    assert cache.grow(running, 16) is False  # no fifth


def test_reuse_off_caches_nothing() -> None:
    cache = kv_cache.PagedKVCache(capacity=16, tokens_per_block=TPB, reuse=False)
    hashes = kv_cache.block_hashes(tokens(10), TPB)
    holding, _ = cache.admit(hashes, 10)
    cache.release(holding, hashes)
    _, cached = cache.admit(hashes, 10)
    assert cached == 0 and cache.cached_blocks == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 12)), max_size=40))
def test_the_block_counts_always_add_up(ops: list[tuple[int, int, int]]) -> None:
    """Whatever runs and ends: used + unheld cached blocks never exceed the capacity, used is
    the running sequences' blocks (shared ones once), and everything ends free."""
    cache = kv_cache.PagedKVCache(capacity=12, tokens_per_block=TPB)
    rng = random.Random(len(ops))
    running: list[tuple[object, list[int]]] = []
    for prefix, length, generated in ops:
        prompt = tokens(min(length, 8), prefix * 1000) + tokens(
            max(0, length - 8), rng.randint(1, 99) * 10
        )
        admitted = cache.admit(kv_cache.block_hashes(prompt, TPB), len(prompt))
        if admitted is not None:
            holding, cached = admitted
            assert 0 <= cached < len(prompt)
            if rng.random() < 0.7:
                cache.store(holding, kv_cache.block_hashes(prompt, TPB))  # its context ended
            seq = prompt + tokens(generated, 5000)
            if not cache.grow(holding, len(seq)):
                seq = prompt
            running.append((holding, seq))
        if running and rng.random() < 0.5:
            holding, seq = running.pop(rng.randrange(len(running)))
            cache.release(holding, kv_cache.block_hashes(seq, TPB))
        assert cache.used + len(cache.evictable) <= cache.capacity
        held = {h for holding, _ in running for h in holding.cached}
        assert set(cache.references) == held
        assert cache.own == sum(holding.own for holding, _ in running)
        assert cache.free == cache.capacity - cache.used >= 0
    for holding, seq in running:
        cache.release(holding, kv_cache.block_hashes(seq, TPB))
    assert cache.used == 0 and cache.free == cache.capacity


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        kv_cache.PagedKVCache(capacity=0, tokens_per_block=4)
