"""The request ticket (plugins/request_ticket.py): one object per request, released once, through
one path, whatever ends the request; the admission first (with the gate's reservation), then
the routing reservations left."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from plugins.request_ticket import Admission, Held, RequestTicket, Routing, TicketBook


@dataclass
class Owner:
    """Records what it is asked to release, as the plugins do."""

    name: str
    log: list[str]
    fail: bool = False
    dropped_tickets: list[str] = field(default_factory=list)

    async def release(self, ticket: RequestTicket) -> None:
        if self.name == "admission":
            adopted = ticket.routing.adopted if ticket.routing else None
            if adopted is not None:
                ticket.take(adopted)
                self.log.append(f"admission+{adopted.reservation_id}")
            else:
                self.log.append("admission")
            if self.fail:
                raise RuntimeError("redis went away")
        else:
            self.log.extend(f"routing-{h.reservation_id}" for h in ticket.take_reservations())

    def dropped(self, ticket: RequestTicket) -> None:
        self.dropped_tickets.append(ticket.call_id)


def admitted_and_routed(book: TicketBook, log: list[str], fail: bool = False) -> RequestTicket:
    admission, routing = Owner("admission", log, fail), Owner("routing", log)
    ticket = book.open("call")
    ticket.admission = Admission(admission, "m", ("a", "b"), local=False)
    gate = Held("a", "gate", False)
    ticket.routing = Routing(routing, [gate, Held("b", "retry", False)], "a", gate)
    return ticket


@pytest.mark.parametrize("end_by", ["call", "call.restart1"])
async def test_a_ticket_is_released_once_admission_first_with_the_gates_reservation(
    end_by: str,
) -> None:
    book, log = TicketBook(), []
    ticket = admitted_and_routed(book, log)
    assert book.alias("call.restart1", "call") is ticket  # a restarted stream joins it
    assert book.open("call.restart1") is ticket and len(book) == 1
    assert await book.end(end_by)
    assert log == ["admission+gate", "routing-retry"]
    for again in ("call", "call.restart1"):
        assert not await book.end(again)  # a second hook finds it ended
    assert log == ["admission+gate", "routing-retry"] and len(book) == 0 and ticket.ended


async def test_the_routing_part_is_released_even_when_the_admissions_release_fails() -> None:
    book, log = TicketBook(), []
    admitted_and_routed(book, log, fail=True)
    with pytest.raises(RuntimeError):
        await book.end("call")
    assert log == ["admission+gate", "routing-retry"]


def test_an_attempts_reservation_comes_out_alone_and_the_adopted_one_with_it() -> None:
    ticket = admitted_and_routed(TicketBook(), [])
    assert ticket.take_reservation("c") is None
    retry = ticket.take_reservation("b")
    assert retry is not None and retry.reservation_id == "retry"
    assert ticket.routing is not None and ticket.routing.adopted is not None
    gate = ticket.take_reservation(None)  # the latest left: the gate's
    assert gate is not None and gate.reservation_id == "gate" and ticket.routing.adopted is None
    assert ticket.take_reservations() == []


def test_tickets_held_past_the_longest_hold_are_dropped_and_their_owners_told() -> None:
    book, log = TicketBook(), []
    old = admitted_and_routed(book, log)
    old.opened_at -= 100
    book.open("fresh")
    assert book.expire(max_age_s=50) == [old]
    assert old.ended and book.get("call") is None and book.get("fresh") is not None
    assert old.admission is not None and old.admission.owner.dropped_tickets == ["call"]  # type: ignore[attr-defined]
    assert old.routing is not None and old.routing.owner.dropped_tickets == ["call"]  # type: ignore[attr-defined]
    assert log == []  # dropped, not released: its leases end by themselves
