"""Short leases, renewed by the process that holds them: counts that heal within one lease.

Admission tickets (``admitted:{model}``) and routing reservations (``inflight:{id}``) are members
of sorted sets whose score is their lease's expiry. The lease is short (``lease_ms``, default
8 s) and the proxy process that holds an entry renews it every ``renew_ms`` (2 s) while the
request runs, for all of its entries in **one** Redis call (``renew.lua``), in a background
task: never on a request's path. So:

* a proxy that dies (SIGKILL, OOM) stops renewing: its tickets and reservations stop counting
  one lease after its last renewal;
* a release lost to a Redis outage leaves an entry nobody renews: the live proxy retries the
  release with its renewals (``release_later``), so it is gone the moment Redis answers again;
  if that proxy died too, one lease after its last renewal;
* a live request, however long (a stream of many minutes), keeps its entries: its process
  renews them; if Redis lost them (restarted without its data, or an outage longer than the
  lease) the renewal finds them missing and puts them back at once (``restore``);
* a replica reported down (fresh state, unhealthy) counts none of its reservations: its
  requests fail and are retried elsewhere, where the retry's reservation counts.

The policy is these pure functions, mirrored in ``lease_lib.lua`` (the scripts decide there);
``tests/test_leases_policy.py`` asserts both agree. Why not ownership by proxy instance (a
heartbeat key per proxy, the scripts dropping entries of dead owners): it heals a dead proxy but
not a live proxy's release lost to a Redis outage (the measured fault: a Redis restart left a
quarter of the gate's capacity in phantom tickets for the old 15-minute lease), and every gate
call would have to check an owner per entry instead of one ``ZREMRANGEBYSCORE``.

A process also drops (and stops renewing) an entry it has held for longer than ``max_hold_ms``:
a request that long is taken for a lost release in this process (a hook that never fired),
logged, and left to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.keyschema import ReplicaState
from core.lua import ScriptProtocol, fields, lua_source
from core.redis_client import PoolExhausted, PoolWaits, cancel_requested

log = logging.getLogger(__name__)

RENEW_LUA = Path(__file__).with_name("renew.lua")
RENEW = ScriptProtocol("renew", args=fields(("lease_ms", "int"), "mode"))
"""``renew.lua``: KEYS the sorted sets; after ``lease_ms`` and ``mode`` (renew | restore |
release), per key the number of its members, then the members; replies the missing members
per key."""

DEFAULT_LEASE_MS = 8_000
"""Lease of a ticket or a reservation after its last renewal: the longest a dead proxy's entry,
or one whose release was lost, holds capacity."""
DEFAULT_RENEW_MS = 2_000
"""How often a process renews its entries' leases (a quarter of the lease: three renewals may
fail or come late before a live entry's lease ends)."""
DEFAULT_MAX_HOLD_MS = 3_600_000
"""An entry held longer by a process is taken for a lost release there (logged, left to
expire)."""
MIN_RENEWALS_PER_LEASE = 3
RETRY_WHILE_FAILING_S = 0.25
"""After a failed renewal (Redis down), the next try comes this soon (at most ``renew_ms``):
the live entries are back in Redis within this long after Redis is."""


# -- the policy (mirrored in lease_lib.lua) -------------------------------------------------


def lease_expiry(now_ms: int, lease_ms: int) -> int:
    """The score an entry gets when taken or renewed at ``now_ms`` (Redis ``TIME``, ms)."""
    return now_ms + lease_ms


def lease_live(expiry_ms: float, now_ms: int) -> bool:
    """Whether an entry (ticket or reservation) still counts: its lease has not ended.
    ``lease_lib.lua``'s ``live_entries`` removes the others (``ZREMRANGEBYSCORE -inf now``)."""
    return expiry_ms > now_ms


def replica_down(state: ReplicaState | None, now_ms: int, stale_after_ms: int) -> bool:
    """Whether a replica is reported down: a fresh state (as the routing policy's) that says
    unhealthy. Missing or stale state is unknown, not down: its reservations keep counting."""
    return state is not None and state.ts_ms >= now_ms - stale_after_ms and not state.healthy


def counted_reservations(expiries: Iterable[float], now_ms: int, down: bool) -> int:
    """The reservations of one replica that count (``lease_lib.lua``'s
    ``counted_reservations``): the live ones, none while the replica is reported down."""
    if down:
        return 0
    return sum(1 for expiry in expiries if lease_live(expiry, now_ms))


def check_lease_settings(lease_ms: int, renew_ms: int, max_hold_ms: int) -> None:
    """Raise ``ValueError`` unless a lease survives two missed renewals and the longest hold
    is longer than a lease."""
    if renew_ms * MIN_RENEWALS_PER_LEASE > lease_ms:
        raise ValueError(
            f"renew_ms ({renew_ms}) must be at most lease_ms / {MIN_RENEWALS_PER_LEASE} "
            f"({lease_ms} / {MIN_RENEWALS_PER_LEASE}): a live request's lease must survive a "
            "late or failed renewal"
        )
    if max_hold_ms < lease_ms:
        raise ValueError(f"max_hold_ms ({max_hold_ms}) must be at least lease_ms ({lease_ms})")


# -- the renewer ----------------------------------------------------------------------------

Entries = Mapping[str, Sequence[str]]
"""Sorted-set key -> the members this process holds in it."""


class LeaseRenewer:
    """Renews, every ``renew_ms``, the leases of what ``held()`` returns, in one Redis call;
    puts back (``restore``) members Redis lost that ``still_held(key, member)`` says are held;
    retries the releases that failed (``release_later``: Redis was down), so that a live
    proxy's lost releases are gone the moment Redis answers again, not one lease later.
    Runs while anything is held or to be released (``wake()`` starts it again)."""

    def __init__(
        self,
        component: str,
        client: Callable[[], Redis],
        held: Callable[[], Entries],
        still_held: Callable[[str, str], bool],
        lease_ms: int,
        renew_ms: int,
        log_interval_s: float,
    ) -> None:
        self._component = component
        self._client = client
        self._held = held
        self._still_held = still_held
        self._lease_ms = lease_ms
        self._renew_s = renew_ms / 1000.0
        self._log_interval_s = log_interval_s
        self._task: asyncio.Task[None] | None = None
        self._script_client: Redis | None = None
        self._script: AsyncScript | None = None
        self._last_error_log = -float("inf")
        self._failing_since: float | None = None
        self._pool_waits = PoolWaits(component, log_interval_s)
        self._unreleased: dict[tuple[str, str], float] = {}
        """(key, member) -> when its release failed: retried until one lease has passed (its
        lease has ended by then, the member no longer counts)."""
        self.renewals = 0
        """Renewal calls that succeeded (tests, diagnostics)."""
        self.restored = 0
        """Members put back after Redis lost them."""
        self.released_late = 0
        """Members whose failed release a later call did."""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Something is held now: make sure the renewals run (inside the event loop)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def release_later(self, key: str, member: str) -> None:
        """The release of ``member`` (no longer held) failed: retry it with the renewals."""
        self._unreleased[(key, member)] = time.monotonic()
        self.wake()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not cancel_requested():
            failing = self._failing_since is not None
            await asyncio.sleep(
                min(self._renew_s, RETRY_WHILE_FAILING_S) if failing else self._renew_s
            )
            try:
                entries = self._held()
                self._forget_moot_releases()
                if not any(entries.values()) and not self._unreleased:
                    return  # nothing held: the next wake() starts again
                await self.renew(entries)
            except Exception:  # a fault here must not end the renewals of live requests
                log.exception(
                    "%s: lease renewal failed unexpectedly; trying again", self._component
                )

    def _forget_moot_releases(self) -> None:
        limit = time.monotonic() - self._lease_ms / 1000.0
        for item in [i for i, since in self._unreleased.items() if since < limit]:
            del self._unreleased[item]

    async def renew(self, entries: Entries) -> bool:
        """One renewal of ``entries`` (with a restore of what Redis lost, and the releases
        that failed before); False on failure (logged, rate-limited; retried soon)."""
        keys = [k for k, members in entries.items() if members]
        try:
            if self._unreleased:
                await self._release_late()
            if keys:
                await self._renew(keys, entries)
        except PoolExhausted as exc:
            self._pool_waits.exhausted(exc, "a lease renewal", "retried at the next interval")
            return False
        except RedisError as exc:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._last_error_log >= self._log_interval_s:
                self._last_error_log = now
                log.warning(
                    "%s: renewing %d leases failed (%s: %s); retrying every %g s (failing "
                    "for %.1f s; a lease ends %d ms after its last renewal, and is put back "
                    "when redis answers again; %d releases wait to be retried)",
                    self._component,
                    sum(len(entries[k]) for k in keys),
                    type(exc).__name__,
                    exc,
                    min(self._renew_s, RETRY_WHILE_FAILING_S),
                    now - self._failing_since,
                    self._lease_ms,
                    len(self._unreleased),
                )
            return False
        if self._failing_since is not None:
            log.warning(
                "%s: lease renewals work again after %.1f s",
                self._component,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        self.renewals += 1
        return True

    async def _renew(self, keys: list[str], entries: Entries) -> None:
        missing = await self._call(keys, entries, "renew")
        lost = {key: [m for m in gone if self._still_held(key, m)] for key, gone in missing.items()}
        if any(lost.values()):
            await self._call([k for k, m in lost.items() if m], lost, "restore")
            count = sum(len(m) for m in lost.values())
            self.restored += count
            log.warning(
                "%s: %d held entries were missing from redis (restarted without its data, "
                "or an outage longer than the %d ms lease); put back",
                self._component,
                count,
                self._lease_ms,
            )

    async def _release_late(self) -> None:
        pending = list(self._unreleased)
        by_key: dict[str, list[str]] = {}
        for key, member in pending:
            by_key.setdefault(key, []).append(member)
        await self._call(list(by_key), by_key, "release")
        for item in pending:
            self._unreleased.pop(item, None)
        self.released_late += len(pending)
        log.warning(
            "%s: %d releases that failed while redis was unreachable done now",
            self._component,
            len(pending),
        )

    async def _call(self, keys: list[str], entries: Entries, mode: str) -> dict[str, list[str]]:
        client = self._client()
        if self._script is None or self._script_client is not client:
            self._script = client.register_script(lua_source(RENEW_LUA, RENEW))
            self._script_client = client
        args = RENEW.argv(lease_ms=self._lease_ms, mode=mode)
        for key in keys:
            members = list(entries[key])
            args.append(str(len(members)))
            args.extend(members)
        reply = await self._script(keys=keys, args=args)
        return {
            key: [m.decode() if isinstance(m, bytes) else str(m) for m in gone]
            for key, gone in zip(keys, reply, strict=True)
        }
