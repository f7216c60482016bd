"""Redis side of the routing policy: atomic pick-and-reserve, release, and a snapshot.

``pick`` runs ``pick.lua``, which applies the policy of ``policy.py`` inside Redis and reserves
the chosen replica in the same script: one round trip, and every pick is visible to the next one
at once, from any proxy. A reservation is a member of the sorted set ``inflight:{id}`` whose
score is its lease expiry: ``release`` removes it (idempotent, so success and failure callbacks
may both fire), and a reservation whose release was lost (a crashed proxy) stops counting when
its lease ends. ``snapshot`` reads what the script reads so that tests (and diagnostics) can run
the Python mirror on the same data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from redis.asyncio import Redis

from plugins.routing.policy import Candidate, PolicyParams
from triage.keyschema import KeySchema, ReplicaState

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
PICK_LUA = _HERE / "pick.lua"
RELEASE_LUA = _HERE / "release.lua"
COUNT_LUA = _HERE / "count.lua"

DEFAULT_LEASE_MS = 900_000
"""Lease of a reservation: longer than any request (LiteLLM's default timeout is 600 s)."""

MAX_TIEBREAK = 2**53
"""``tiebreak`` must be in ``[0, MAX_TIEBREAK)``: Lua holds it as an exact double."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _float_arg(value: float) -> str:
    """Shortest round-trip form: Lua's ``tonumber`` (strtod) reads back the same double."""
    return repr(float(value))


@dataclass(frozen=True)
class Reservation:
    """One in-flight slot taken on a replica by ``RoutingStore.pick``."""

    replica_id: str
    reservation_id: str
    inflight: int
    """The replica's live reservations right after this one was taken."""
    score: float


class RoutingStore:
    """Pick-and-reserve and release of replicas on the shared Redis load store."""

    def __init__(self, client: Redis, keys: KeySchema | None = None) -> None:
        self._client = client
        self._keys = keys if keys is not None else KeySchema()
        self._pick = client.register_script(PICK_LUA.read_text())
        self._release = client.register_script(RELEASE_LUA.read_text())
        self._count = client.register_script(COUNT_LUA.read_text())

    @property
    def keys(self) -> KeySchema:
        return self._keys

    async def pick(
        self,
        replica_ids: Sequence[str],
        params: PolicyParams,
        tiebreak: int,
        reservation_id: str | None = None,
        lease_ms: int = DEFAULT_LEASE_MS,
    ) -> Reservation | None:
        """Choose a replica among ``replica_ids`` and reserve it, atomically.

        Returns the reservation, or None when no candidate is eligible. ``tiebreak`` (e.g.
        ``random.getrandbits(32)``) spreads exact ties; it must be in ``[0, 2**53)``.
        ``reservation_id`` must be unique among live reservations (default: a random UUID).
        """
        ids = list(replica_ids)
        if not ids:
            return None
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate replica ids: {ids}")
        if not 0 <= tiebreak < MAX_TIEBREAK:
            raise ValueError(f"tiebreak must be in [0, 2**53), got {tiebreak}")
        if lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {lease_ms}")
        reservation = reservation_id if reservation_id is not None else uuid.uuid4().hex
        keys = [self._keys.replica(r) for r in ids] + [self._keys.inflight(r) for r in ids]
        args: list[str] = [
            str(len(ids)),
            str(tiebreak),
            str(int(params.stale_after_ms)),
            _float_arg(params.kv_threshold),
            _float_arg(params.kv_weight),
            _float_arg(params.unknown_score),
            _float_arg(params.default_service_ms),
            _float_arg(params.tie_tolerance),
            reservation,
            str(int(lease_ms)),
            *ids,
        ]
        reply = await self._pick(keys=keys, args=args)
        index = int(reply[0])
        if index == 0:
            return None
        return Reservation(ids[index - 1], reservation, int(reply[1]), float(_text(reply[2])))

    async def release(self, replica_id: str, reservation_id: str) -> int:
        """Give back one reservation (idempotent); returns the replica's live reservations."""
        value = await self._release(keys=[self._keys.inflight(replica_id)], args=[reservation_id])
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
