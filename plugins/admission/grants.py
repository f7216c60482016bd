"""Grant notifications: a queued request wakes the moment ``gate.lua`` hands it a slot.

``gate.lua`` publishes each ticket it grants on the model's grant channel. One pub/sub
connection per proxy process listens to the channels of the models it has seen and sets the
event of the local waiter holding that ticket (tickets of other processes are ignored). A
message lost to a reconnect costs the waiter at most its fallback poll (``poll_ms``): it
claims its grant by polling either way. A message is ``<ticket> <grant number>``; the highest
number seen per channel (``granted``) says how far the fleet-wide queue moved, which the
controller's shed memo reads (numbers, not counts: a message that arrives after the reply of a
script call it preceded is not counted twice).

The same connection listens to the model's enqueue channel: ``<enqueue number> <score> <flow>
<ticket>`` for each request any proxy queued (its queue score, its flow or ``-``).
``enqueued_since`` counts those after a reply's number of the same flow or with a score below a
bound: the arrivals now ahead of this process's next request of that flow in the fair order.
``generation`` changes with every (re)connection: messages may have been missed in between.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from core.redis_client import cancel_requested

log = logging.getLogger(__name__)

LISTEN_TIMEOUT_S = 0.5
"""Longest single read of the pub/sub connection (below the client's socket timeout)."""
ENQUEUES_KEPT = 4096
"""Enqueue messages remembered per channel (a memo older than these is not trusted)."""


@dataclass
class Enqueues:
    """Recent enqueue messages of one channel, in number order (Redis publishes in order)."""

    numbers: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    flows: list[str] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)

    def add(self, number: int, score: float, flow: str, ticket: str) -> None:
        if self.numbers and number <= self.numbers[-1]:
            return  # a repeat (or out of order): never counted twice
        self.numbers.append(number)
        self.scores.append(score)
        self.flows.append(flow)
        self.tickets.append(ticket)
        if len(self.numbers) > 2 * ENQUEUES_KEPT:
            del self.numbers[:ENQUEUES_KEPT], self.scores[:ENQUEUES_KEPT]
            del self.flows[:ENQUEUES_KEPT], self.tickets[:ENQUEUES_KEPT]

    def since(
        self, number: int, bound: float, flow: str = "", besides: Collection[str] = ()
    ) -> int | None:
        """Enqueues numbered above ``number`` ahead of the next request of ``flow`` whose score
        is at least ``bound``: those of its own flow (first come, first served within a flow)
        and those of other flows with a lower score; except the tickets ``besides``. None when
        some of them are no longer kept."""
        if self.numbers and number < self.numbers[0] - 1:
            return None
        start = bisect.bisect_right(self.numbers, number)
        rows = zip(self.scores[start:], self.flows[start:], self.tickets[start:], strict=True)
        return sum(1 for score, f, t in rows if (f == flow or score < bound) and t not in besides)


class GrantListener:
    def __init__(self, client: Redis, retry_s: float) -> None:
        self._client = client
        self._retry_s = retry_s
        self._channels: set[str] = set()
        self._waiters: dict[str, asyncio.Event] = {}
        self.granted: dict[str, int] = {}
        """The highest grant number seen per channel (all processes' tickets)."""
        self._enqueues: dict[str, Enqueues] = {}
        """Enqueue channels watched, with their recent messages."""
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._lost = False
        """The channel failed and has not been read since (logged once per outage)."""
        self._closing = False
        self.generation = 0
        """Counts (re)connections: a memo of another generation may have missed messages."""

    def expect(self, ticket: str) -> asyncio.Event:
        """The event set when ``ticket`` is granted (register before entering the queue)."""
        event = self._waiters[ticket] = asyncio.Event()
        return event

    @property
    def listening(self) -> bool:
        """Connected and reading: ``granted`` misses nothing (none lost to a reconnect)."""
        return self._pubsub is not None and not self._lost

    def forget(self, ticket: str) -> None:
        self._waiters.pop(ticket, None)

    def enqueued_since(
        self,
        channel: str,
        number: int,
        bound: float,
        flow: str = "",
        besides: Collection[str] = (),
    ) -> int | None:
        """Requests queued on ``channel`` after enqueue ``number`` ahead of the next request of
        ``flow`` (score at least ``bound``), except the tickets ``besides``; None when not known
        (not watched, or older than the messages kept)."""
        enqueues = self._enqueues.get(channel)
        return enqueues.since(number, bound, flow, besides) if enqueues is not None else None

    async def watch(self, grants: str, enqueues: str | None = None) -> None:
        """Listen to a model's ``grants`` channel (and its ``enqueues`` channel) from now on
        (a no-op after the first call)."""
        if grants in self._channels:
            return
        channels = [grants] if enqueues is None else [grants, enqueues]
        self._channels.update(channels)
        if enqueues is not None:
            self._enqueues[enqueues] = Enqueues()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        if self._pubsub is None:
            await self._connect()  # subscribed before the caller's ticket can be granted
        else:
            await self._pubsub.subscribe(*channels)

    async def _connect(self) -> PubSub:
        async with self._connecting:
            if self._pubsub is None:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(*self._channels)
                self._pubsub = pubsub
                self.generation += 1
            return self._pubsub

    async def _listen(self) -> None:
        while not self._closing and not cancel_requested():
            try:
                pubsub = self._pubsub or await self._connect()
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT_S
                )
            except (RedisError, OSError) as exc:
                log.log(
                    logging.DEBUG if self._lost else logging.WARNING,
                    "admission: grant channel lost (%s: %s); waiters poll until it is back "
                    "(retry every %.1f s)",
                    type(exc).__name__,
                    exc,
                    self._retry_s,
                )
                self._lost = True
                await self._drop()
                await asyncio.sleep(self._retry_s)
                continue
            except Exception:  # a redis-py fault must not end the listening: log, reconnect
                log.exception("admission: reading the grant channel failed; reconnecting")
                self._lost = True
                await self._drop()
                await asyncio.sleep(self._retry_s)
                continue
            if self._lost:
                self._lost = False
                log.warning("admission: grant channel back")
            if message is not None and message.get("type") == "message":
                self._received(message["channel"], message["data"])

    def _received(self, channel: bytes | str, data: bytes | str) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        text = data.decode() if isinstance(data, bytes) else str(data)
        first, _, second = text.partition(" ")
        enqueues = self._enqueues.get(channel)
        if enqueues is not None:  # "<enqueue number> <score> <flow, or -> <ticket>"
            score, _, rest = second.partition(" ")
            flow, _, ticket = rest.partition(" ")
            try:
                value = float(score)
            except ValueError:
                value = math.nan
            if first.isdigit() and math.isfinite(value) and flow:
                enqueues.add(int(first), value, "" if flow == "-" else flow, ticket)
            return
        if second.isdigit():  # "<ticket> <grant number>"
            self.granted[channel] = max(self.granted.get(channel, 0), int(second))
        event = self._waiters.get(first)
        if event is not None:
            event.set()

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, OSError) as exc:
                log.debug("admission: closing the grant channel failed: %s", exc)

    async def aclose(self) -> None:
        # a flag besides the cancel: redis-py's timed read can absorb a cancellation
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, LISTEN_TIMEOUT_S + self._retry_s + 1)
        await self._drop()
