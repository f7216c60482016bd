"""Redis side of admission: ``gate.lua`` (enter, poll, leave, release) for one model; a waiter
learns of its grant on the model's grant channel (``grants.py``). With a ``PickPlan`` (the
routing plugin routes the model), the call that admits also picks and reserves the replica:
one Redis round trip for both decisions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from redis.asyncio import Redis

from plugins.admission.settings import AdmissionSettings
from plugins.routing.store import PickPlan, Reservation
from triage.keyschema import KeySchema
from triage.lua import lua_source

GATE_LUA = Path(__file__).with_name("gate.lua")


class Status(IntEnum):
    ADMITTED = 1
    WAITING = 0
    QUEUE_FULL = -1
    NO_CAPACITY = -2
    LOST = -3
    WAIT_TOO_LONG = -4
    DONE = 2


@dataclass(frozen=True)
class GateReply:
    status: Status
    capacity: int
    outstanding: int
    queued: int
    ahead: int
    drain_rps: float
    grants: int
    """The model's grant number when the gate answered (``grantseq``)."""
    enqueued: int
    """The model's enqueue number when the gate answered (``enqueueseq``)."""
    throughput_rps: float = 0.0
    """Completions/s of the model's healthy replicas with every batch slot busy (Σ max_active
    / mean request time; 0 while none is measured): how fast a full queue moves."""
    reservation: Reservation | None = None
    """Admitted with a ``PickPlan``: the replica reserved for the request (None when the
    script found no eligible replica; the router then picks as usual)."""

    @property
    def work_ahead(self) -> float:
        """Requests to finish before a new one gets in: the queue ahead, the excess, itself."""
        return float(self.ahead + max(0, self.outstanding - self.capacity) + 1)


class AdmissionGate:
    def __init__(self, client: Redis, settings: AdmissionSettings) -> None:
        self._client = client
        self._settings = settings
        self._keys = KeySchema(settings.key_prefix)
        self._script = client.register_script(lua_source(GATE_LUA))

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def keys(self) -> KeySchema:
        return self._keys

    async def _call(
        self,
        op: str,
        model: str,
        replica_ids: Sequence[str],
        ticket: str,
        priority: int,
        ahead_limit: float | None = None,
        pick: PickPlan | None = None,
        routed: tuple[str, str] | None = None,
    ) -> GateReply:
        s = self._settings
        keys = [
            self._keys.admitted(model),
            self._keys.queue(model),
            self._keys.queue_lease(model),
            self._keys.queue_seq(model),
            self._keys.grant_seq(model),
            self._keys.enqueue_seq(model),
            *(self._keys.replica(r) for r in replica_ids),
            *(self._keys.inflight(r) for r in replica_ids),  # the routing plugin's reservations
        ]
        args = [
            op,
            ticket,
            str(priority),
            str(s.lease_ms),
            str(s.queue_lease_ms),
            str(s.queue_allowance),
            str(s.unknown_replica_slots),
            str(s.stale_after_ms),
            str(s.queue_limit(priority)),
            str(s.max_queue),
            self._keys.grants(model),
            "" if ahead_limit is None else repr(float(ahead_limit)),
            self._keys.enqueues(model),
        ]
        if pick is not None:
            args += [*pick.args(), *replica_ids]
        if routed is not None:  # release: (replica index, reservation id)
            args += [str(replica_ids.index(routed[0]) + 1), routed[1]]
        reply = await self._script(keys=keys, args=args)
        return GateReply(
            Status(int(reply[0])),
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
            int(reply[4]),
            _float(reply[5]),
            int(reply[6]),
            int(reply[7]),
            _float(reply[8]),
            pick.reservation(replica_ids, reply[9:12]) if pick and len(reply) >= 12 else None,
        )

    async def enter(
        self,
        model: str,
        replica_ids: Sequence[str],
        ticket: str,
        priority: int,
        ahead_limit: float | None = None,
        pick: PickPlan | None = None,
    ) -> GateReply:
        """Admit, queue, or refuse ``ticket``; with ``ahead_limit``, refuse it
        (``WAIT_TOO_LONG``) rather than queue it behind more than that many; with ``pick``,
        an admitted ticket's replica is reserved as well (``GateReply.reservation``)."""
        return await self._call(
            "enter", model, replica_ids, ticket, priority, ahead_limit, pick=pick
        )

    async def peek(
        self, model: str, replica_ids: Sequence[str], priority: int, ahead_limit: float | None
    ) -> GateReply:
        """What a new request of ``priority`` would find (``ahead``; ``WAIT_TOO_LONG`` over
        ``ahead_limit``), changing nothing but the grants every call makes first."""
        return await self._call("peek", model, replica_ids, "", priority, ahead_limit)

    async def poll(
        self,
        model: str,
        replica_ids: Sequence[str],
        ticket: str,
        priority: int,
        pick: PickPlan | None = None,
    ) -> GateReply:
        """A waiter keeps its place, or claims its grant (then, with ``pick``, its replica)."""
        return await self._call("poll", model, replica_ids, ticket, priority, pick=pick)

    async def leave(self, model: str, replica_ids: Sequence[str], ticket: str) -> GateReply:
        """A waiter gives up its place (or a grant it has not claimed); frees slots go on."""
        return await self._call("leave", model, replica_ids, ticket, 0)

    async def release(
        self,
        model: str,
        replica_ids: Sequence[str],
        ticket: str,
        routed: tuple[str, str] | None = None,
    ) -> GateReply:
        """An admitted request ended: its slot goes to the queue's head at once. ``routed``
        (replica id, reservation id; the replica one of ``replica_ids``): the request's routing
        reservation, released in the same call."""
        return await self._call("release", model, replica_ids, ticket, 0, routed=routed)

    async def counts(self, model: str) -> tuple[int, int]:
        """(outstanding, queued) after dropping expired entries: for tests and diagnostics."""
        reply = await self.peek(model, [], 0, None)  # changes nothing but the grants
        return reply.outstanding, reply.queued

    def grants_channel(self, model: str) -> str:
        return self._keys.grants(model)

    def enqueues_channel(self, model: str) -> str:
        return self._keys.enqueues(model)


def _float(value: bytes | str | float) -> float:
    """A number the script sends as a string (Lua numbers become integers on the way out)."""
    return float(value.decode() if isinstance(value, bytes) else value)
