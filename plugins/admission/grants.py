"""Grant notifications: a queued request wakes the moment ``gate.lua`` hands it a slot.

``gate.lua`` publishes each ticket it grants on the model's grant channel. One pub/sub
connection per proxy process listens to the channels of the models it has seen and sets the
event of the local waiter holding that ticket (tickets of other processes are ignored). A
message lost to a reconnect costs the waiter at most its fallback poll (``poll_ms``): it
claims its grant by polling either way. A message is ``<ticket> <grant number>``; the highest
number seen per channel (``granted``) says how far the fleet-wide queue moved, which the
controller's shed memo reads (numbers, not counts: a message that arrives after the reply of a
script call it preceded is not counted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LISTEN_TIMEOUT_S = 0.5
"""Longest single read of the pub/sub connection (below the client's socket timeout)."""


class GrantListener:
    def __init__(self, client: Redis, retry_s: float) -> None:
        self._client = client
        self._retry_s = retry_s
        self._channels: set[str] = set()
        self._waiters: dict[str, asyncio.Event] = {}
        self.granted: dict[str, int] = {}
        """The highest grant number seen per channel (all processes' tickets)."""
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._lost = False
        self._closing = False
        """The channel failed and has not been read since (logged once per outage)."""

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

    async def watch(self, channel: str) -> None:
        """Listen to ``channel`` from now on (a no-op after the first call)."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        if self._pubsub is None:
            await self._connect()  # subscribed before the caller's ticket can be granted
        else:
            await self._pubsub.subscribe(channel)

    async def _connect(self) -> PubSub:
        async with self._connecting:
            if self._pubsub is None:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(*self._channels)
                self._pubsub = pubsub
            return self._pubsub

    async def _listen(self) -> None:
        while not self._closing:
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
                channel, data = message["channel"], message["data"]
                channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                text = data.decode() if isinstance(data, bytes) else str(data)
                ticket, _, number = text.partition(" ")
                if number.isdigit():
                    self.granted[channel] = max(self.granted.get(channel, 0), int(number))
                event = self._waiters.get(ticket)
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
