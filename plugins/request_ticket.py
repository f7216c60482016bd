"""One request, one ticket: everything a proxied request holds, from its admission to its end.

A ``RequestTicket`` is created when the admission plugin admits the request (or, without it, at
the routing plugin's first pick) and carries the admission (``Admission``: the model's ticket in
the fleet-wide gate, or a per-process slot while Redis is out), the routing reservations of its
attempts (``Routing``: the one the gate took with the admission, those of the router's picks),
and the replicas its attempts failed on (avoided by its retries and stream restarts, which join
the ticket under their own call ids: ``alias``).

It is released exactly once, through one path, ``TicketBook.end``: whichever of LiteLLM's hooks
reports the request's end first (a non-stream success, the proxy's error answer, a stream's
last chunk, a client that went away: ``plugins/request_end.py``) ends it; later ones find it
ended. The admission is released first, taking the gate's routing reservation with it in the
same Redis call; then the routing plugin gives back what else the request still holds. A ticket
whose end is never reported is dropped after the longest hold (``expire``): its leases in Redis
are no longer renewed, so they end by themselves.

The two plugins meet here and nowhere else: each fills its own part of the ticket and is its
``TicketOwner`` (it releases that part). The routing strategy also offers itself as this
process's ``ReplicaPicker`` (``TicketBook.picker``), so that the admission gate can pick the
replica in the call that admits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from plugins.routing.policy import RequestShape
    from plugins.routing.store import PickPlan, Reservation

log = logging.getLogger(__name__)


class TicketOwner(Protocol):
    """A plugin that holds a part of tickets."""

    async def release(self, ticket: RequestTicket) -> None:
        """The request ended: give back this plugin's part of ``ticket``."""

    def dropped(self, ticket: RequestTicket) -> None:
        """``ticket`` was held longer than the longest hold: taken for a lost release (its
        leases end by themselves; per-process counts are given back here)."""


class ReplicaPicker(Protocol):
    """The routing strategy, offering the admission gate a pick in the call that admits."""

    def describe(self, call_id: str, request: Mapping[str, Any]) -> None:
        """Note the request's shape (size, prompt blocks) for the picks of ``call_id``."""

    def shape(self, call_id: str) -> RequestShape:
        """The shape ``describe`` noted (``NO_SHAPE`` when none): its size counts in the fair
        share between flows too."""
        ...

    def plan_pick(self, call_id: str) -> PickPlan | None: ...

    def adopt(self, model: str, ticket: RequestTicket, reservation: Reservation) -> None: ...

    def installed_on(self, router: Any) -> bool: ...


@dataclass(frozen=True)
class Held:
    """One routing reservation: in Redis (``inflight:{replica}``), or a per-process count while
    Redis was out (``local``)."""

    replica_id: str
    reservation_id: str
    local: bool


@dataclass
class Admission:
    owner: TicketOwner
    model: str
    replica_ids: tuple[str, ...]
    local: bool
    """A per-process slot (Redis was out), not a ticket in the fleet-wide gate."""
    priority: int = 0
    flow: str = ""
    """The fair share's flow the request was admitted as, its weight, and the tokens it was
    charged (its prompt and ``max_tokens``): corrected by its usage at the release."""
    weight: float = 1.0
    cost: float = 1.0


@dataclass
class Routing:
    owner: TicketOwner
    reservations: list[Held] = field(default_factory=list)
    prepicked: str | None = None
    """The replica the admission gate reserved, until the first attempt routes there."""
    adopted: Held | None = None
    """The gate's reservation (one of ``reservations``), released with the admission."""
    shape: RequestShape | None = None
    """The request's size and prompt-block hashes, for its picks (``routing/prefix.py``)."""


@dataclass
class RequestTicket:
    call_id: str
    opened_at: float = field(default_factory=time.monotonic)
    admission: Admission | None = None
    routing: Routing | None = None
    failed: set[str] = field(default_factory=set)
    """Replicas an attempt of this request failed on."""
    attempt_ids: list[str] = field(default_factory=list)
    """Other call ids of this request (stream restarts)."""
    ended: bool = False
    usage_tokens: int | None = None
    """Prompt + completion tokens the response reported (None: not reported)."""

    def take_reservation(self, replica_id: str | None) -> Held | None:
        """Out of the ticket: the latest reservation on ``replica_id`` (any, if None)."""
        routing = self.routing
        if routing is None:
            return None
        for index in range(len(routing.reservations) - 1, -1, -1):
            held = routing.reservations[index]
            if replica_id is None or held.replica_id == replica_id:
                del routing.reservations[index]
                if routing.adopted == held:
                    routing.adopted = None
                return held
        return None

    def take(self, held: Held) -> bool:
        """Out of the ticket: ``held`` itself; whether it was there."""
        routing = self.routing
        if routing is None or held not in routing.reservations:
            return False
        routing.reservations.remove(held)
        if routing.adopted == held:
            routing.adopted = None
        return True

    def take_reservations(self) -> list[Held]:
        """Out of the ticket: every reservation it still holds."""
        if self.routing is None:
            return []
        held, self.routing.reservations, self.routing.adopted = self.routing.reservations, [], None
        return held


class TicketBook:
    """The tickets of one proxy process, by call id (a ticket's own and its attempts')."""

    def __init__(self) -> None:
        self._by_id: dict[str, RequestTicket] = {}
        self.picker: ReplicaPicker | None = None
        """The routing strategy installed in this process, if any (set by its ``install``)."""

    def __len__(self) -> int:
        return sum(1 for _ in self.tickets())

    def get(self, call_id: str) -> RequestTicket | None:
        return self._by_id.get(call_id)

    def open(self, call_id: str) -> RequestTicket:
        """The ticket of ``call_id``, created if it has none."""
        ticket = self._by_id.get(call_id)
        if ticket is None:
            ticket = self._by_id[call_id] = RequestTicket(call_id)
        return ticket

    def alias(self, attempt_id: str, call_id: str) -> RequestTicket:
        """``attempt_id`` (a restarted stream's call id) is the request ``call_id``'s too."""
        ticket = self.open(call_id)
        ticket.attempt_ids.append(attempt_id)
        self._by_id[attempt_id] = ticket
        return ticket

    def tickets(self) -> Iterator[RequestTicket]:
        """Every open ticket, once."""
        for call_id, ticket in self._by_id.items():
            if ticket.call_id == call_id:
                yield ticket

    def _remove(self, ticket: RequestTicket) -> None:
        ticket.ended = True
        for call_id in (ticket.call_id, *ticket.attempt_ids):
            if self._by_id.get(call_id) is ticket:
                del self._by_id[call_id]

    async def end(self, call_id: str) -> bool:
        """The request ``call_id`` (or one of its attempts) ended: release its ticket, once.
        Returns whether this call released it."""
        ticket = self._by_id.get(call_id)
        if ticket is None or ticket.ended:
            return False
        self._remove(ticket)
        try:
            if ticket.admission is not None:
                await ticket.admission.owner.release(ticket)
        finally:
            if ticket.routing is not None:
                await ticket.routing.owner.release(ticket)
        return True

    def expire(self, max_age_s: float, now: float | None = None) -> list[RequestTicket]:
        """Drop the tickets held longer than ``max_age_s`` (lost releases); their owners are
        told (``TicketOwner.dropped``)."""
        limit = (time.monotonic() if now is None else now) - max_age_s
        old = [t for t in self.tickets() if t.opened_at < limit]
        for ticket in old:
            self._remove(ticket)
            owners = {id(p.owner): p.owner for p in (ticket.admission, ticket.routing) if p}
            for owner in owners.values():
                owner.dropped(ticket)
        return old


TICKETS = TicketBook()
"""This process's tickets: the admission and routing plugins of one proxy share them."""
