"""Redis side of the routing policy: atomic pick-and-reserve, release, and a snapshot.

``pick`` runs ``pick.lua``, which applies the policy of ``policy.py`` inside Redis and reserves
the chosen replica in the same script: one round trip, and every pick is visible to the next one
at once, from any proxy. A reservation is a member of the sorted set ``inflight:{id}`` whose
score is its lease expiry: ``release`` removes it (idempotent, so success and failure callbacks
may both fire). The process holding a reservation renews its lease while the request runs
(``leases.py``), so one whose release was lost (a crashed proxy, a Redis outage) stops counting
one short lease after its last renewal. ``snapshot`` reads what the script reads so that tests
(and diagnostics) can run the Python mirror on the same data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState
from core.lua import ArgGroup, ScriptProtocol, fields, lua_source
from plugins.routing.leases import DEFAULT_LEASE_MS
from plugins.routing.policy import (
    NO_SHAPE,
    Candidate,
    PolicyParams,
    RequestShape,
    reservation_member,
    reserved_tokens,
)
from plugins.routing.prefix import cached_prefix

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
PICK_LUA = _HERE / "pick.lua"
RELEASE_LUA = _HERE / "release.lua"
COUNT_LUA = _HERE / "count.lua"


PICK_PARAMS = ArgGroup(
    "pick_params",
    fields(
        ("tiebreak", "int"),
        ("stale_after_ms", "int"),
        ("kv_threshold", "float"),
        ("kv_weight", "float"),
        ("unknown_score", "float"),
        ("default_service_ms", "float"),
        ("tie_tolerance", "float"),
        "reservation",
        ("lease_ms", "int"),
        ("prefill_ms_per_token", "float"),
        ("prefix_index_blocks", "int"),
        ("block_tokens", "float"),
        ("prefix_ttl_ms", "int"),
        ("prompt_tokens", "int"),
        ("output_tokens", "int"),
        ("tokens_per_block", "float"),
        ("blocks", "int"),
        "session",
    ),
)
"""The policy's parameters, the reservation to take and the request's shape, as
``pick_lib.lua`` reads them (after the pick's own arguments in ``pick.lua``, after the gate's in
``gate.lua``); the replica ids, then the ``blocks`` prompt-block hashes, follow them."""
PICKED = fields(("index", "int"), ("inflight", "int"), ("score", "float"))
"""What a pick answers: the chosen candidate (1-based; 0 = none eligible), its reservations
now, its score."""
PICK = ScriptProtocol("pick", args=fields(("n", "int")), reply=PICKED)
"""``pick.lua``: KEYS the N replica hashes, their reservation sets, their prefix indexes; ARGV
``n``, then ``PICK_PARAMS``, then the N replica ids, then the prompt-block hashes."""
RELEASE = ScriptProtocol("release", keys=("inflight",), args=fields("reservation"))
"""``release.lua``: replies the replica's live reservations (a number)."""
COUNT = ScriptProtocol("count")
"""``count.lua``: KEYS the reservation sets; replies their live counts, in order."""


def candidate_keys(keys: KeySchema, replica_ids: Sequence[str]) -> list[str]:
    """The keys ``pick_lib.lua`` reads of the candidates (in ``pick.lua`` and ``gate.lua``):
    their replica hashes, reservation sets and prefix indexes, in that order."""
    return [
        *(keys.replica(r) for r in replica_ids),
        *(keys.inflight(r) for r in replica_ids),
        *(keys.prefix_index(r) for r in replica_ids),
    ]


MAX_TIEBREAK = 2**53
"""``tiebreak`` must be in ``[0, MAX_TIEBREAK)``: Lua holds it as an exact double."""


@dataclass(frozen=True)
class Reservation:
    """One in-flight slot taken on a replica by ``pick_lib.lua`` (``RoutingStore.pick``, or the
    admission gate picking in the call that admits)."""

    replica_id: str
    reservation_id: str
    """Its member in ``inflight:{id}`` (``PickPlan.member``: the plan's id and the size)."""
    inflight: int
    """The replica's live reservations right after this one was taken."""
    score: float


@dataclass(frozen=True)
class PickPlan:
    """What ``pick_lib.lua`` needs besides the candidates' keys and ids: the policy, a
    tiebreak for exact ties, and the reservation to take."""

    params: PolicyParams
    tiebreak: int
    """In ``[0, MAX_TIEBREAK)`` (e.g. ``random.getrandbits(32)``): spreads exact ties."""
    reservation_id: str
    """Unique among live reservations."""
    lease_ms: int = DEFAULT_LEASE_MS
    shape: RequestShape = NO_SHAPE
    """The request's size and prompt-block hashes (``prefix.request_shape``)."""

    @property
    def member(self) -> str:
        """The reservation's name in ``inflight:{id}``: its id and its size in output tokens
        (``policy.reservation_member``); what ``Reservation.reservation_id`` holds."""
        return reservation_member(self.reservation_id, self.shape.output_tokens)

    def __post_init__(self) -> None:
        if not 0 <= self.tiebreak < MAX_TIEBREAK:
            raise ValueError(f"tiebreak must be in [0, 2**53), got {self.tiebreak}")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {self.lease_ms}")

    def args(self) -> list[str]:
        """``PICK_PARAMS``, encoded."""
        p = self.params
        return PICK_PARAMS.argv(
            tiebreak=self.tiebreak,
            stale_after_ms=int(p.stale_after_ms),
            kv_threshold=p.kv_threshold,
            kv_weight=p.kv_weight,
            unknown_score=p.unknown_score,
            default_service_ms=p.default_service_ms,
            tie_tolerance=p.tie_tolerance,
            reservation=self.member,
            lease_ms=int(self.lease_ms),
            prefill_ms_per_token=p.prefill_ms_per_token,
            prefix_index_blocks=p.prefix_index_blocks,
            block_tokens=p.block_tokens,
            prefix_ttl_ms=p.prefix_ttl_ms,
            prompt_tokens=self.shape.prompt_tokens,
            output_tokens=self.shape.output_tokens,
            tokens_per_block=self.shape.tokens_per_block,
            blocks=len(self.shape.hashes),
            session=self.shape.session,
        )

    def tail(self, replica_ids: Sequence[str]) -> list[str]:
        """What follows ``PICK_PARAMS`` in ARGV: the replica ids, then the block hashes."""
        return [*replica_ids, *self.shape.hashes]

    def reservation(
        self, replica_ids: Sequence[str], index: int, inflight: int, score: float
    ) -> Reservation | None:
        """The reservation a pick's ``PICKED`` fields describe (None: index 0, none taken)."""
        if index == 0:
            return None
        return Reservation(replica_ids[index - 1], self.member, inflight, score)


class RoutingStore:
    """Pick-and-reserve and release of replicas on the shared Redis load store."""

    def __init__(self, client: Redis, keys: KeySchema | None = None) -> None:
        self._client = client
        self._keys = keys if keys is not None else KeySchema()
        self._pick = client.register_script(lua_source(PICK_LUA, PICK, PICK_PARAMS))
        self._release = client.register_script(lua_source(RELEASE_LUA, RELEASE))
        self._count = client.register_script(lua_source(COUNT_LUA, COUNT))

    @property
    def keys(self) -> KeySchema:
        return self._keys

    @property
    def client(self) -> Redis:
        return self._client

    async def pick(
        self,
        replica_ids: Sequence[str],
        params: PolicyParams,
        tiebreak: int,
        reservation_id: str | None = None,
        lease_ms: int = DEFAULT_LEASE_MS,
        shape: RequestShape = NO_SHAPE,
    ) -> Reservation | None:
        """Choose a replica among ``replica_ids`` and reserve it, atomically.

        Returns the reservation, or None when no candidate is eligible. ``tiebreak`` (e.g.
        ``random.getrandbits(32)``) spreads exact ties; it must be in ``[0, 2**53)``.
        ``reservation_id`` must be unique among live reservations (default: a random UUID).
        """
        reservation = reservation_id if reservation_id is not None else uuid.uuid4().hex
        plan = PickPlan(params, tiebreak, reservation, lease_ms, shape)
        return await self.pick_planned(replica_ids, plan)

    async def pick_planned(self, replica_ids: Sequence[str], plan: PickPlan) -> Reservation | None:
        """``pick`` with its arguments in one ``PickPlan``."""
        ids = list(replica_ids)
        if not ids:
            return None
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate replica ids: {ids}")
        keys = self.candidate_keys(ids)
        args = PICK.argv([*plan.args(), *plan.tail(ids)], n=len(ids))
        reply, _ = PICK.decode(await self._pick(keys=PICK.keys_for(keys), args=args))
        return plan.reservation(ids, **reply)

    def candidate_keys(self, replica_ids: Sequence[str]) -> list[str]:
        return candidate_keys(self._keys, replica_ids)

    async def cached_blocks(self, replica_ids: Sequence[str], shape: RequestShape) -> list[int]:
        """The prompt's leading blocks each replica's prefix index holds (as the pick reads
        them), in one round trip: for tests and diagnostics."""
        ids = list(replica_ids)
        if not shape.hashes or not ids:
            return [0] * len(ids)
        async with self._client.pipeline(transaction=True) as pipe:
            for replica_id in ids:
                pipe.zmscore(self._keys.prefix_index(replica_id), list(shape.hashes))
            replies = await pipe.execute()
        return [cached_prefix(found) for found in replies]

    async def session_holders(self, replica_ids: Sequence[str], shape: RequestShape) -> list[bool]:
        """Whether each replica's index holds the request's session (as the pick reads it), in
        one round trip: for tests and diagnostics."""
        ids = list(replica_ids)
        if not shape.session or not ids:
            return [False] * len(ids)
        async with self._client.pipeline(transaction=True) as pipe:
            for replica_id in ids:
                pipe.zscore(self._keys.prefix_index(replica_id), shape.session)
            replies = await pipe.execute()
        return [score is not None for score in replies]

    async def reserved(self, replica_ids: Sequence[str], unknown_size: int) -> list[int]:
        """The output tokens each replica's reservations carry (``policy.reserved_tokens``: as
        the pick sums them; call after ``snapshot``, which drops the ended leases), in one round
        trip: for tests and diagnostics."""
        ids = list(replica_ids)
        if not ids:
            return []
        async with self._client.pipeline(transaction=True) as pipe:
            for replica_id in ids:
                pipe.zrange(self._keys.inflight(replica_id), 0, -1)
            replies = await pipe.execute()
        return [
            reserved_tokens(
                (m.decode() if isinstance(m, bytes) else m for m in members), unknown_size
            )
            for members in replies
        ]

    async def release(self, replica_id: str, reservation_id: str) -> int:
        """Give back one reservation (idempotent); returns the replica's live reservations."""
        value = await self._release(
            keys=RELEASE.keys_for(inflight=self._keys.inflight(replica_id)),
            args=RELEASE.argv(reservation=reservation_id),
        )
        return int(value)

    async def inflight(self, replica_ids: Sequence[str]) -> list[int]:
        """Live (unexpired) reservations per replica, in one round trip."""
        ids = list(replica_ids)
        if not ids:
            return []
        counts = await self._count(keys=[self._keys.inflight(r) for r in ids], args=[])
        return [int(c) for c in counts]

    async def snapshot(self, replica_ids: Sequence[str]) -> list[Candidate]:
        """``(replica_id, state or None, inflight)`` per replica, in one pipelined round trip.

        A missing or invalid hash gives None (logged at debug); no reservations give 0.
        """
        ids = list(replica_ids)
        if not ids:
            return []
        async with self._client.pipeline(transaction=True) as pipe:
            for replica_id in ids:
                pipe.hgetall(self._keys.replica(replica_id))
            await self._count(keys=[self._keys.inflight(r) for r in ids], args=[], client=pipe)
            replies = await pipe.execute()
        counts = replies[-1]
        out: list[Candidate] = []
        for i, replica_id in enumerate(ids):
            raw = replies[i]
            state: ReplicaState | None = None
            if not raw:
                log.debug("replica %s: no state in redis (missing or expired hash)", replica_id)
            else:
                try:
                    state = ReplicaState.from_redis(raw)
                except ValidationError as exc:
                    log.debug(
                        "replica %s: invalid state hash %r: %s", replica_id, raw, exc.errors()
                    )
            out.append((replica_id, state, int(counts[i])))
        return out
