"""The admission policy: pure functions (no I/O), mirrored by ``gate.lua``.

``gate.lua`` applies these rules inside Redis, atomically, for every proxy at once; a property
test (``tests/test_gate_parity.py``) puts the same state in Redis and here and asserts that both
decide alike: the status, the counts, the grants and the fleet's rates, compared with ``==``.
The expected-wait limit (``expected_wait.py``) and Retry-After (``retry_after.py``) are the other
two admission policies; both run in Python only.

The fleet (``fleet``), per replica of the model, as the router reads it (``ReplicaState`` is
None for a missing or invalid hash, the same hashes ``pick_lib.lua`` holds invalid)::

    fresh, healthy  -> slots max_active, counts toward the allowance and the rates
    fresh, down     -> slots 0; its reservations do not count (their requests are failing
                       and will be retried elsewhere)
    missing, invalid or stale -> unknown_slots
    capacity = Σ slots + allowance × healthy
    free     = Σ max(0, slots - reservations)  -  admitted tickets not yet routed

Grants (``grant_count``), made first on every call: queue heads move into the admitted set while
a batch slot is free somewhere (``free > 0``) and ``outstanding < capacity``: never into the
allowance, since a request that waited has used its time already.

A new request (``enter``) is admitted while nobody is queued ahead of it and
``outstanding < capacity`` (the allowance keeps every batch slot fed without a round trip between
one request's end and the next one's start); else refused with no reachable replica, a full
queue (``max_queue``, or its priority's own limit) or more than ``ahead_limit`` ahead; else
queued. A waiter's ``poll`` claims its grant, keeps its place, or learns that its place expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from core.keyschema import ReplicaState


class Status(IntEnum):
    ADMITTED = 1
    WAITING = 0
    QUEUE_FULL = -1
    NO_CAPACITY = -2
    LOST = -3
    WAIT_TOO_LONG = -4
    DONE = 2


@dataclass(frozen=True)
class GateParams:
    """The gate's knobs for one call (from ``AdmissionSettings``)."""

    allowance: int
    """Per healthy replica, admitted work beyond max_active."""
    unknown_slots: int
    """Slots counted for a replica with no fresh, valid state."""
    stale_after_ms: int
    queue_limit: int
    """The most places this call's priority may hold in the queue."""
    max_queue: int
    ahead_limit: float | None = None
    """``enter``/``peek``: refuse rather than queue behind more than this many (None: no limit)."""


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the gate reads it: its state (None: missing or invalid) and its live
    routing reservations."""

    state: ReplicaState | None
    reservations: int = 0


@dataclass(frozen=True)
class Fleet:
    slots: int
    healthy: int
    unknown: int
    capacity: int
    free: int
    """Σ over replicas of their batch slots not reserved by the router."""
    reserved: int
    """Reservations that count (a down replica's do not)."""
    drain_rps: float
    """Σ of the healthy replicas' published completions/s."""
    throughput_rps: float
    """Σ over healthy replicas of max_active × 1000 / request_ms: the completions/s with every
    batch slot busy (0 while none is measured)."""

    @property
    def reachable(self) -> bool:
        """Some replica may take work (healthy, or unknown: its sidecar may just be down)."""
        return self.healthy + self.unknown > 0


def fleet(replicas: Sequence[ReplicaLoad], p: GateParams, now_ms: int) -> Fleet:
    slots = healthy = unknown = free = reserved = 0
    drain = throughput = 0.0
    for replica in replicas:  # in order: the float sums are the same as gate.lua's
        s = replica.state
        own = 0
        down = False
        if s is None or s.ts_ms < now_ms - p.stale_after_ms:
            own = p.unknown_slots
            unknown += 1
        elif not s.healthy:
            down = True
        else:
            own = s.max_active
            healthy += 1
            if s.drain_rps is not None and s.drain_rps > 0:
                drain = drain + s.drain_rps
            if s.request_ms is not None and s.request_ms > 0:
                throughput = throughput + own * 1000 / s.request_ms
        slots += own
        taken = 0 if down else replica.reservations
        reserved += taken
        free += max(0, own - taken)
    return Fleet(
        slots=slots,
        healthy=healthy,
        unknown=unknown,
        capacity=slots + p.allowance * healthy,
        free=free,
        reserved=reserved,
        drain_rps=drain,
        throughput_rps=throughput,
    )


def free_slots(f: Fleet, outstanding: int) -> int:
    """Batch slots free for a waiter: the unreserved ones less the admitted tickets not yet
    routed (without the routing plugin nothing is reserved: slots - outstanding)."""
    return f.free - max(0, outstanding - f.reserved)


def grant_count(f: Fleet, outstanding: int, queued: int) -> int:
    """How many queue heads the gate grants before it answers."""
    return max(0, min(queued, free_slots(f, outstanding), f.capacity - outstanding))


def too_long(ahead: int, ahead_limit: float | None) -> bool:
    return ahead_limit is not None and ahead > ahead_limit


def enter(
    f: Fleet, outstanding: int, queued: int, ahead: int, same_priority: int, p: GateParams
) -> Status:
    """A new request (after the grants): ``ahead`` queued before it (better priority, or the
    same and earlier), ``same_priority`` queued at its priority."""
    if ahead == 0 and outstanding < f.capacity:
        return Status.ADMITTED
    if not f.reachable:
        return Status.NO_CAPACITY
    if queued >= p.max_queue or same_priority >= p.queue_limit:
        return Status.QUEUE_FULL
    if too_long(ahead, p.ahead_limit):
        return Status.WAIT_TOO_LONG
    return Status.WAITING


def peek(ahead: int, p: GateParams) -> Status:
    """What a new request would find with ``ahead`` queued at its priority or better."""
    return Status.WAIT_TOO_LONG if too_long(ahead, p.ahead_limit) else Status.WAITING


def poll(granted: bool, in_queue: bool) -> Status:
    """A waiter: its grant came (claim it), it still has its place, or the place expired."""
    if granted:
        return Status.ADMITTED
    return Status.WAITING if in_queue else Status.LOST


PRIORITY_UNIT = 2**40
"""Queue order: priority × 2^40 + arrival sequence (lower first)."""


@dataclass
class GateView:
    """The live part of one model's gate state (after the expired entries are dropped):
    admitted tickets, and the queue in order as ``(ticket, priority)``."""

    admitted: set[str] = field(default_factory=set)
    queue: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    status: Status
    fleet: Fleet
    outstanding: int
    queued: int
    ahead: int
    granted: tuple[str, ...]
    """Queue heads granted by this call, in order."""


def gate_call(
    view: GateView,
    op: str,
    ticket: str,
    priority: int,
    replicas: Sequence[ReplicaLoad],
    p: GateParams,
    now_ms: int,
) -> Decision:
    """One gate call on ``view`` (changed in place), as ``gate.lua`` makes it: ``enter``,
    ``poll``, ``peek``, ``leave`` or ``release``. ``replicas`` are read after a release's routing
    reservation is given back."""
    if op in ("release", "leave"):
        view.admitted.discard(ticket)
        view.queue = [(t, q) for t, q in view.queue if t != ticket]
    f = fleet(replicas, p, now_ms)
    outstanding = len(view.admitted)
    count = grant_count(f, outstanding, len(view.queue))
    granted = tuple(t for t, _ in view.queue[:count])
    view.queue = view.queue[count:]
    view.admitted.update(granted)
    outstanding += count
    queued = len(view.queue)

    def decided(status: Status, out: int = outstanding, waiting: int = queued, ahead: int = 0):
        return Decision(status, f, out, waiting, ahead, granted)

    if op in ("release", "leave"):
        return decided(Status.DONE)
    if op == "peek":
        ahead = sum(1 for _, q in view.queue if q <= priority)
        return decided(peek(ahead, p), ahead=ahead)
    if op == "enter":
        if ticket in view.admitted:
            return decided(Status.ADMITTED)
        ahead = sum(1 for _, q in view.queue if q <= priority)  # it arrives last of its tier
        same = sum(1 for _, q in view.queue if q == priority)
        status = enter(f, outstanding, queued, ahead, same, p)
        if status == Status.ADMITTED:
            view.admitted.add(ticket)
            return decided(status, out=outstanding + 1)
        if status == Status.WAITING:
            view.queue.insert(ahead, (ticket, priority))
            return decided(status, waiting=queued + 1, ahead=ahead)
        return decided(status, ahead=ahead)
    if op == "poll":
        rank = next((i for i, (t, _) in enumerate(view.queue) if t == ticket), None)
        status = poll(ticket in view.admitted, rank is not None)
        return decided(status, ahead=rank or 0)
    raise ValueError(f"unknown gate op {op!r}")
