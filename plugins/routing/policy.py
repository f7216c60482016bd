"""The routing policy: one set of pure functions (no I/O), mirrored by ``pick.lua``.

A replica's score estimates the **expected completion time** of this request on it, plus the
delay its prefill adds to the requests it shares the batch with (lower is better)::

    n          = max(inflight, active + waiting)        # reserved by proxies vs seen at the replica
    C          = max_active                             # the executor's cap on active requests
    s          = service_ms (or the candidates' mean, or default_service_ms)
    kv_penalty = 1 + kv_weight * max(0, kv_fraction - kv_threshold) / (1 - kv_threshold)
    uncached   = max(1, prompt_tokens - cached_blocks * tokens_per_block)   (0: no prompt size)
    prefill    = prefill_ms_per_token * uncached * (1 + min(n, C - 1))   # itself + its batch

    source "trtllm" (s is one engine iteration; sizes in tokens, o = the request's output tokens):
    ahead      = reserved + max(0, active + waiting - inflight) * o   # the n requests' tokens
    wait       = max(0, n + 1 - C) / C * (ahead / n)                  # iterations until a slot
    score      = (o + wait) * s * kv_penalty + prefill
    source "triton" (s is one whole request):
    score      = max(1, (n + 1) / C) * s * kv_penalty + prefill

``reserved`` is the output tokens the replica's live reservations carry: every reservation is
named ``<id>#<output tokens>`` (``reservation_member``) and ``reserved_tokens`` sums them (one
without a size counts as ``o``). Requests the replica runs that no proxy reserved (other
clients; reservations lost with Redis) are taken to be of this request's size. So a replica
whose slots are taken by long requests loses to one whose queue holds many short ones, and with
every request of one size the score is ``max(1, (n + 1) / C) * s * o``, the request-count score.

The request's own size (``RequestShape``: its prompt tokens, its expected output, the salted
hashes of its prompt's blocks) enters three times: its decode as ``output_tokens`` engine
iterations, its share of the batch behind the tokens reserved ahead of it, and the prefill of
the prompt tokens the replica does not hold in its KV cache. ``cached_blocks`` is
how many of the prompt's leading blocks the replica's prefix index holds (``prefix.py``; the
index is read and updated by ``pick_lib.lua`` in the call that picks). Without a shape
(``output_tokens = 1``, no prompt) this is the request-count score it always was. A cached
prefix saves only its prefill time, so a replica that holds it but has a longer wait loses as
soon as the wait costs more than the prefill saved: load wins over affinity, and one hot prefix
does not herd every request onto one replica.

A prefill is not the request's own business: TensorRT-LLM runs a request's context phase in an
engine iteration beside the requests generating there (chunked prefill spreads it over several,
the same total), so every one of them waits as long as the prefill. The score counts that delay
for the ``min(n, C - 1)`` requests it will share the batch with: a prompt's uncached tokens cost
``1 + min(n, C - 1)`` times their prefill. On an idle replica a cache miss costs the request
alone; on a busy one it costs the batch, and a replica holding the prefix is worth that much
more. The stand-in stalls its batch for a prefill in the same way.

With in-flight batching a request that finds a free batch slot (``n < C``) starts at once and
takes about ``s``; one that finds all ``C`` slots taken waits for ``n - C + 1`` completions, one
every ``s / C`` on average: ``s + (n - C + 1) * s / C = (n + 1) * s / C``. In tokens, with
the requests ahead as far along as each other on average (their progress is not known), a
completion comes every ``m / C`` iterations, ``m = ahead / n`` their mean size: the wait for a
slot is ``(n - C + 1) / C * m`` iterations, then the request's own ``o``. Below saturation the
sizes ahead do not matter: every running request decodes one token per iteration.
Below saturation the score is flat (all replicas of one speed tie, and the tie rules spread by
in-flight count), so a slow replica is not used while a faster one has a free slot; the
oracle's ``(n + 1) * s / C`` (processor sharing) would send work to an idle half-speed replica
as soon as the fast ones hold one request each, which costs latency (measured in
``tests/test_proxy_skewed.py``).

* A replica with no state (missing or expired hash) or a stale one (``ts_ms`` older than
  ``now_ms - stale_after_ms``) is *unknown*: ``score = unknown_score + inflight``. Unknowns stay
  usable (spread among themselves by in-flight count) but lose to any known healthy replica
  whose score is below ``unknown_score``. A stale hash is unknown even if it says unhealthy: the
  health flag is as old as the counts.
* A fresh, unhealthy replica scores ``math.inf`` and is never chosen.
* ``choose`` treats every score within ``tie_tolerance`` of the lowest as tied
  (``score <= best + |best| * tie_tolerance``): measured service times of identical replicas
  differ by noise, and a strict minimum would send every request of an idle fleet to the same
  replica. Among the tied, the fewest in-flight (the proxies' reservations: the freshest
  signal), then the most cached blocks of the prompt (a prefill saving within the noise still
  keeps one cache warm: affinity on an idle or evenly loaded fleet, never onto a replica with
  more requests in flight), then the replicas that have served the request's session (session
  affinity, for prompts that share no text: the OpenAI ``user`` field or LiteLLM's session id,
  ``prefix.session_member``); among those still tied, the replica ids sorted by code point
  (= UTF-8 byte order) and index ``tiebreak % len(tied)``, so a random ``tiebreak`` from the
  caller spreads ties.

Bit-identical with Lua
----------------------
``pick.lua`` runs the same policy inside Redis (Lua 5.1, every number an IEEE double), and a
property test asserts both choose the same replica with the same score, compared with ``==``.
For that, the arithmetic here is written in one fixed order, each step a single double
operation that Lua performs identically:

* ``kv_penalty = 1.0 + ((kv_weight * excess) / (1.0 - kv_threshold))`` with
  ``excess = max(0.0, kv_fraction - kv_threshold)``;
* ``uncached = max(1.0, prompt_tokens - (cached_blocks * tokens_per_block))``;
  ``prefill = (prefill_ms_per_token * uncached) * (1 + min(n, max_active - 1))``;
* trtllm: ``ahead = reserved + (max(0, (active + waiting) - inflight) * o)``,
  ``wait = (max(0, (n + 1) - max_active) / max_active) * (ahead / n)`` (0 when ``n + 1 <=
  max_active``) and ``score = (((o + wait) * service_ms) * kv_penalty) + prefill`` (token
  counts are integers, exact as doubles);
* triton: ``score = ((max(1.0, (n + 1) / max_active) * service_ms) * kv_penalty) + prefill``
  (the integers ``n + 1`` and ``max_active`` are exact);
* unknown: ``unknown_score + inflight``;
* the mean service time is a left-to-right running sum divided by the count (not ``sum()``,
  whose float algorithm differs across Python versions, nor ``statistics.mean``);
* floats travel as shortest round-trip decimal strings (``repr``; Redis parses them with
  ``strtod``) and the score comes back as ``%.17g``, so no value is rounded on the way.

Integer fields are compared as integers; ``now_ms`` is Redis ``TIME`` in whole milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.keyschema import ReplicaState

Candidate = tuple[str, ReplicaState | None, int]
"""(replica_id, published state or None when missing/invalid, in-flight reservations)."""

MAX_PROMPT_BLOCKS = 1024
"""The most prompt blocks a pick looks up and indexes (longer prompts: their first blocks)."""

SIZE_MARK = "#"
"""Separates a reservation's id from its size in output tokens (``reservation_member``)."""
MAX_RESERVED_SIZE = 1_000_000_000
"""A reservation's size is valid in ``[1, MAX_RESERVED_SIZE]``; any other counts as unknown."""


def reservation_member(reservation_id: str, output_tokens: int) -> str:
    """The name of a reservation in ``inflight:{id}``: its id and its size in output tokens, so
    that every proxy's pick can weigh the work already on the replica (``reserved_tokens``)."""
    if not 1 <= output_tokens <= MAX_RESERVED_SIZE:
        raise ValueError(f"output_tokens must be in [1, {MAX_RESERVED_SIZE}]: {output_tokens}")
    return f"{reservation_id}{SIZE_MARK}{output_tokens}"


def reservation_size(member: str) -> int | None:
    """The size a reservation's name carries; None when it carries none (or an invalid one)."""
    _, mark, digits = member.rpartition(SIZE_MARK)
    if not mark or not digits or not all("0" <= c <= "9" for c in digits) or len(digits) > 10:
        return None
    size = int(digits)
    return size if 1 <= size <= MAX_RESERVED_SIZE else None


def reserved_tokens(members: Iterable[str], unknown_size: int) -> int:
    """The output tokens a replica's live reservations carry; ``unknown_size`` for each one
    that carries none (``pick_lib.lua``'s ``reserved_tokens`` mirrors this)."""
    total = 0
    for member in members:
        size = reservation_size(member)
        total += unknown_size if size is None else size
    return total


@dataclass(frozen=True)
class RequestShape:
    """What the pick knows of the request before it is sent: its size and the salted hashes of
    its prompt's leading blocks (``prefix.py``). The default is a request of unknown size."""

    prompt_tokens: int = 0
    output_tokens: int = 1
    """Expected output tokens: engine iterations on a trtllm replica."""
    tokens_per_block: float = 0.0
    """Prompt tokens per block (the blocks are fixed in characters)."""
    hashes: tuple[str, ...] = ()
    """Hex block hashes, first block first: what the prefix index stores (never text)."""
    session: str = ""
    """The index member of the request's session (``prefix.session_member``; "" for none): a
    replica that has served the session wins the ties its prompt's blocks leave."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.output_tokens < 1:
            raise ValueError(f"prompt_tokens {self.prompt_tokens}, output {self.output_tokens}")
        if not (math.isfinite(self.tokens_per_block) and self.tokens_per_block >= 0.0):
            raise ValueError(f"tokens_per_block must be finite and >= 0: {self.tokens_per_block}")
        if len(self.hashes) > MAX_PROMPT_BLOCKS:
            raise ValueError(f"at most {MAX_PROMPT_BLOCKS} block hashes, got {len(self.hashes)}")

    def uncached_tokens(self, cached_blocks: int) -> float:
        """Prompt tokens to prefill when the first ``cached_blocks`` blocks are cached (at
        least one: the last prompt token is always computed); 0 for a prompt of unknown size."""
        if self.prompt_tokens == 0:
            return 0.0
        return max(1.0, self.prompt_tokens - cached_blocks * self.tokens_per_block)


NO_SHAPE = RequestShape()


@dataclass(frozen=True)
class PolicyParams:
    """Knobs of the policy. Defaults suit a sidecar polling every 250 ms."""

    stale_after_ms: int = 1000
    """A hash whose ``ts_ms`` is older than ``now_ms - stale_after_ms`` is unknown."""
    kv_threshold: float = 0.8
    """KV-cache fraction above which the penalty starts (0 <= threshold < 1)."""
    kv_weight: float = 1.0
    """Penalty added at a full KV cache: the score is multiplied by ``1 + kv_weight``."""
    unknown_score: float = 1e9
    """Base score of an unknown replica: usable, never preferred over a known healthy one."""
    default_service_ms: float = 20.0
    """Service time used when no candidate publishes one yet (a sidecar needs 50 busy engine
    iterations to measure it): a typical TensorRT-LLM decode iteration (and the stand-in's
    default), so that the prefill of uncached prompt tokens weighs as it would."""
    tie_tolerance: float = 0.2
    """Scores within this fraction of the lowest are tied (then the fewest in-flight, then the
    most cached prompt blocks, then random)."""
    prefill_ms_per_token: float = 0.2
    """Prefill time of one prompt token (ms): what a cached prompt block saves. The stand-in's
    default; a TensorRT-LLM 8B model on one H100 prefills roughly 10,000+ tokens/s (0.1)."""
    prefix_index_blocks: int = 4096
    """Blocks the prefix index keeps per replica when the replica publishes no KV capacity."""
    block_tokens: float = 64.0
    """Nominal tokens per index block: a replica's KV capacity in tokens / this = its index's
    bound in blocks (the blocks it may hold; older ones are forgotten first)."""
    prefix_ttl_ms: int = 3_600_000
    """A replica's index expires this long after its last pick (a replica gone for good)."""

    def __post_init__(self) -> None:
        if self.stale_after_ms < 0:
            raise ValueError(f"stale_after_ms must be >= 0, got {self.stale_after_ms}")
        if not 0.0 <= self.kv_threshold < 1.0:
            raise ValueError(f"kv_threshold must be in [0, 1), got {self.kv_threshold}")
        if not (math.isfinite(self.kv_weight) and self.kv_weight >= 0.0):
            raise ValueError(f"kv_weight must be finite and >= 0, got {self.kv_weight}")
        if not math.isfinite(self.unknown_score):
            raise ValueError(f"unknown_score must be finite, got {self.unknown_score}")
        if not (math.isfinite(self.tie_tolerance) and 0.0 <= self.tie_tolerance <= 1.0):
            raise ValueError(f"tie_tolerance must be in [0, 1], got {self.tie_tolerance}")
        if not (math.isfinite(self.default_service_ms) and self.default_service_ms > 0.0):
            raise ValueError(
                f"default_service_ms must be finite and > 0, got {self.default_service_ms}"
            )
        if not (math.isfinite(self.prefill_ms_per_token) and self.prefill_ms_per_token >= 0.0):
            raise ValueError(f"prefill_ms_per_token must be >= 0: {self.prefill_ms_per_token}")
        if self.prefix_index_blocks < 1 or self.prefix_ttl_ms < 1:
            raise ValueError("prefix_index_blocks and prefix_ttl_ms must be >= 1")
        if not (math.isfinite(self.block_tokens) and self.block_tokens > 0.0):
            raise ValueError(f"block_tokens must be finite and > 0, got {self.block_tokens}")


def is_fresh(state: ReplicaState | None, params: PolicyParams, now_ms: int) -> bool:
    """True when the state is present and not older than ``params.stale_after_ms``."""
    return state is not None and state.ts_ms >= now_ms - params.stale_after_ms


def score(
    state: ReplicaState | None,
    inflight: int,
    service_ms: float,
    params: PolicyParams,
    now_ms: int,
    shape: RequestShape = NO_SHAPE,
    cached_blocks: int = 0,
    reserved: int | None = None,
) -> float:
    """Expected completion time of the request ``shape`` on the replica; lower is better.

    ``service_ms`` is the replica's effective service time (see ``effective_service_ms``);
    ``cached_blocks`` the prompt's leading blocks its prefix index holds; ``reserved`` the
    output tokens its counted reservations carry (``reserved_tokens``; None: each of the
    ``inflight`` is taken to be of this request's size).
    Unknown (None or stale) → ``unknown_score + inflight``; unhealthy → ``math.inf``.
    """
    if state is None or not is_fresh(state, params, now_ms):
        return params.unknown_score + inflight
    if not state.healthy:
        return math.inf
    n = max(inflight, state.active + state.waiting)
    excess = max(0.0, state.kv_fraction - params.kv_threshold)
    kv_penalty = 1.0 + params.kv_weight * excess / (1.0 - params.kv_threshold)
    batch = 1 + min(n, state.max_active - 1)  # the prefill delays itself and its batch
    prefill = params.prefill_ms_per_token * shape.uncached_tokens(cached_blocks) * batch
    if state.source != "trtllm":
        return max(1.0, (n + 1) / state.max_active) * service_ms * kv_penalty + prefill
    own = shape.output_tokens
    wait = 0.0
    if n + 1 > state.max_active:  # every slot taken: wait for n - C + 1 completions
        in_reservations = inflight * own if reserved is None else reserved
        ahead = in_reservations + max(0, state.active + state.waiting - inflight) * own
        wait = (n + 1 - state.max_active) / state.max_active * (ahead / n)
    return (own + wait) * service_ms * kv_penalty + prefill


def _own_service_ms(state: ReplicaState | None, params: PolicyParams, now_ms: int) -> float | None:
    """The replica's published service time when usable (fresh, present, > 0), else None."""
    if state is None or not is_fresh(state, params, now_ms):
        return None
    if state.service_ms is None or not state.service_ms > 0.0:
        return None
    return state.service_ms


def effective_service_ms(
    states: Sequence[ReplicaState | None], params: PolicyParams, now_ms: int
) -> list[float]:
    """Per candidate: its own ``service_ms`` when known (fresh, not None, > 0), else the mean
    of the known ones among the candidates, else ``params.default_service_ms``."""
    own = [_own_service_ms(state, params, now_ms) for state in states]
    total = 0.0
    count = 0
    for value in own:  # a plain running sum, in candidate order, as pick.lua does
        if value is not None:
            total = total + value
            count = count + 1
    fallback = total / count if count > 0 else params.default_service_ms
    return [fallback if value is None else value for value in own]


def usable_cached_blocks(
    candidates: Sequence[Candidate], cached: Sequence[int] | None, params: PolicyParams, now_ms: int
) -> list[int]:
    """The cached blocks each candidate is credited with: what its index holds when it is fresh
    and healthy (an unknown or down replica's cache is not counted on)."""
    if cached is None:
        return [0] * len(candidates)
    return [
        blocks if state is not None and is_fresh(state, params, now_ms) and state.healthy else 0
        for (_, state, _), blocks in zip(candidates, cached, strict=True)
    ]


def usable_session(
    candidates: Sequence[Candidate], holds: Sequence[bool] | None, params: PolicyParams, now_ms: int
) -> list[bool]:
    """Whether each candidate has served the request's session and is fresh and healthy."""
    if holds is None:
        return [False] * len(candidates)
    return [
        held and state is not None and is_fresh(state, params, now_ms) and state.healthy
        for (_, state, _), held in zip(candidates, holds, strict=True)
    ]


def scores(
    candidates: Sequence[Candidate],
    params: PolicyParams,
    now_ms: int,
    shape: RequestShape = NO_SHAPE,
    cached: Sequence[int] | None = None,
    reserved: Sequence[int] | None = None,
) -> list[float]:
    """The score of every candidate, in order (``math.inf`` = excluded). ``cached``: the
    prompt's leading blocks each candidate's prefix index holds (``prefix.cached_prefix``);
    ``reserved``: the output tokens each one's counted reservations carry (``reserved_tokens``;
    None: every reservation of this request's size)."""
    blocks = usable_cached_blocks(candidates, cached, params, now_ms)
    return _scores(candidates, params, now_ms, shape, blocks, reserved)


def _scores(
    candidates: Sequence[Candidate],
    params: PolicyParams,
    now_ms: int,
    shape: RequestShape,
    blocks: Sequence[int],
    reserved: Sequence[int] | None,
) -> list[float]:
    service = effective_service_ms([state for _, state, _ in candidates], params, now_ms)
    sizes: Sequence[int | None] = [None] * len(candidates) if reserved is None else reserved
    return [
        score(state, inflight, s, params, now_ms, shape, b, r)
        for (_, state, inflight), s, b, r in zip(candidates, service, blocks, sizes, strict=True)
    ]


def choose(
    candidates: Sequence[Candidate],
    params: PolicyParams,
    now_ms: int,
    tiebreak: int,
    shape: RequestShape = NO_SHAPE,
    cached: Sequence[int] | None = None,
    reserved: Sequence[int] | None = None,
    session: Sequence[bool] | None = None,
) -> str | None:
    """The replica id to send the request to, or None if no candidate is eligible.

    Lowest score; among the scores within ``tie_tolerance`` of it the fewest in-flight, then
    the most cached blocks, then the ones that have served the request's session (``session``:
    per candidate, whether its index holds ``shape.session``); among those, the ids in sorted
    order and index ``tiebreak % len(tied)``.
    """
    blocks = usable_cached_blocks(candidates, cached, params, now_ms)
    sticky = usable_session(candidates, session, params, now_ms)
    ranked = _scores(candidates, params, now_ms, shape, blocks, reserved)
    eligible = [
        (s, b, k, inflight, replica_id)
        for (replica_id, _, inflight), s, b, k in zip(
            candidates, ranked, blocks, sticky, strict=True
        )
        if s < math.inf  # excludes inf (unhealthy) and, defensively, nan
    ]
    if not eligible:
        return None
    best = min(s for s, _, _, _, _ in eligible)
    limit = best + abs(best) * params.tie_tolerance
    tied = [(b, k, n, replica_id) for s, b, k, n, replica_id in eligible if s <= limit]
    fewest = min(n for _, _, n, _ in tied)
    least = [(b, k, replica_id) for b, k, n, replica_id in tied if n == fewest]
    most = max(b for b, _, _ in least)
    warm = [(k, replica_id) for b, k, replica_id in least if b == most]
    held = any(k for k, _ in warm)
    names = sorted(replica_id for k, replica_id in warm if k == held)
    return names[tiebreak % len(names)]
