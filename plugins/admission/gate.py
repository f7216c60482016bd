"""Redis side of admission: ``gate.lua`` (enter, poll, leave, release) for one model; a waiter
learns of its grant on the model's grant channel (``grants.py``). With a ``PickPlan`` (the
routing plugin routes the model), the call that admits also picks and reserves the replica:
one Redis round trip for both decisions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.lua import ScriptProtocol, fields, lua_source
from plugins.admission.rules import NO_FLOW, FlowCall, Status
from plugins.admission.settings import AdmissionSettings
from plugins.routing.store import PICK_PARAMS, PICKED, PickPlan, Reservation, candidate_keys

GATE_LUA = Path(__file__).with_name("gate.lua")

GATE = ScriptProtocol(
    "gate",
    keys=(
        "admitted",
        "queue",
        "queue_lease",
        "fair",
        "queue_flow",
        "flow_queued",
        "deadlines",
        "grant_seq",
        "enqueue_seq",
    ),
    args=fields(
        "op",
        "ticket",
        ("priority", "int"),
        ("lease_ms", "int"),
        ("queue_lease_ms", "int"),
        ("allowance", "int"),
        ("unknown_slots", "int"),
        ("stale_after_ms", "int"),
        ("queue_limit", "int"),
        ("max_queue", "int"),
        "grant_channel",
        ("ahead_limit", "opt_float"),
        "enqueue_channel",
        ("routed_index", "int"),
        "routed_reservation",
        "flow",
        ("weight", "float"),
        ("cost", "float"),
        ("flow_limit", "opt_float"),
        ("usage", "opt_float"),
        ("deadline_ms", "opt_float"),
    ),
    reply=fields(
        ("status", "int"),
        ("capacity", "int"),
        ("outstanding", "int"),
        ("queued", "int"),
        ("ahead", "int"),
        ("drain_rps", "float"),
        ("grants", "int"),
        ("enqueued", "int"),
        ("throughput_rps", "float"),
        ("next_score", "float"),
        *((f"picked_{f.name}", f.kind) for f in PICKED),
    ),
)
"""``gate.lua``: after the fixed keys, the N replica hashes and their N reservation sets; after
the fixed arguments, optionally (enter, poll) ``PICK_PARAMS`` and the N replica ids."""


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
    next_score: float = 0.0
    """``enter``/``peek``: the lowest queue score the caller's flow's next request of that
    priority can get; enqueues below it are ahead of that request (``rules.Decision``)."""
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
        self._script = client.register_script(lua_source(GATE_LUA, GATE, PICK_PARAMS))

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
        flow: FlowCall = NO_FLOW,
        flow_limit: int | None = None,
        usage: float | None = None,
        deadline_ms: float | None = None,
    ) -> GateReply:
        s = self._settings
        k = self._keys
        keys = GATE.keys_for(
            candidate_keys(k, replica_ids),
            admitted=k.admitted(model),
            queue=k.queue(model),
            queue_lease=k.queue_lease(model),
            fair=k.fair(model),
            queue_flow=k.queue_flow(model),
            flow_queued=k.flow_queued(model),
            deadlines=k.deadlines(model),
            grant_seq=k.grant_seq(model),
            enqueue_seq=k.enqueue_seq(model),
        )
        args = GATE.argv(
            [*pick.args(), *pick.tail(replica_ids)] if pick is not None else [],
            op=op,
            ticket=ticket,
            priority=priority,
            lease_ms=s.lease_ms,
            queue_lease_ms=s.queue_lease_ms,
            allowance=s.queue_allowance,
            unknown_slots=s.unknown_replica_slots,
            stale_after_ms=s.stale_after_ms,
            queue_limit=s.queue_limit(priority),
            max_queue=s.max_queue,
            grant_channel=k.grants(model),
            ahead_limit=ahead_limit,
            enqueue_channel=k.enqueues(model),
            routed_index=0 if routed is None else replica_ids.index(routed[0]) + 1,
            routed_reservation="" if routed is None else routed[1],
            flow=flow.flow,
            weight=flow.weight,
            cost=flow.cost,
            flow_limit=flow_limit,
            usage=usage,
            deadline_ms=deadline_ms,
        )
        reply, _ = GATE.decode(await self._script(keys=keys, args=args))
        picked = {f.name: reply.pop(f"picked_{f.name}") for f in PICKED}
        return GateReply(
            status=Status(reply.pop("status")),
            **reply,
            reservation=None if pick is None else pick.reservation(replica_ids, **picked),
        )

    async def enter(
        self,
        model: str,
        replica_ids: Sequence[str],
        ticket: str,
        priority: int,
        ahead_limit: float | None = None,
        pick: PickPlan | None = None,
        flow: FlowCall = NO_FLOW,
        flow_limit: int | None = None,
        deadline_ms: float | None = None,
    ) -> GateReply:
        """Admit, queue, or refuse ``ticket``; with ``ahead_limit``, refuse it
        (``WAIT_TOO_LONG``) rather than queue it behind more than that many; with ``pick``,
        an admitted ticket's replica is reserved as well (``GateReply.reservation``). ``flow``:
        its place in the fair order; ``flow_limit``: the most places its flow may hold
        (``FLOW_FULL`` beyond); ``deadline_ms``: its place ends this long from now (its
        time-to-first-token deadline: never granted after it)."""
        return await self._call(
            "enter",
            model,
            replica_ids,
            ticket,
            priority,
            ahead_limit,
            pick=pick,
            flow=flow,
            flow_limit=flow_limit,
            deadline_ms=deadline_ms,
        )

    async def peek(
        self,
        model: str,
        replica_ids: Sequence[str],
        priority: int,
        ahead_limit: float | None,
        flow: FlowCall = NO_FLOW,
    ) -> GateReply:
        """What a new request of ``flow`` and ``priority`` would find (``ahead``;
        ``WAIT_TOO_LONG`` over ``ahead_limit``), changing nothing but the grants every call
        makes first."""
        return await self._call("peek", model, replica_ids, "", priority, ahead_limit, flow=flow)

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
        priority: int = 0,
        flow: FlowCall = NO_FLOW,
        usage: float | None = None,
    ) -> GateReply:
        """An admitted request ended: its slot goes to the queue's head at once. ``routed``
        (replica id, reservation id; the replica one of ``replica_ids``): the request's routing
        reservation, released in the same call. ``usage``: the tokens it used, of ``flow`` at
        ``priority`` (charged ``flow.cost`` when it came in: the fair share is corrected)."""
        return await self._call(
            "release", model, replica_ids, ticket, priority, routed=routed, flow=flow, usage=usage
        )

    async def counts(self, model: str) -> tuple[int, int]:
        """(outstanding, queued) after dropping expired entries: for tests and diagnostics."""
        reply = await self.peek(model, [], 0, None)  # changes nothing but the grants
        return reply.outstanding, reply.queued

    def grants_channel(self, model: str) -> str:
        return self._keys.grants(model)

    def enqueues_channel(self, model: str) -> str:
        return self._keys.enqueues(model)
