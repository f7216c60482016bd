"""The expected-wait policy: one pure function (no I/O) saying how many requests may wait ahead
of a new one before it is better answered 503 at once than queued.

A request that joins the queue behind ``ahead`` others waits about ``(ahead + 1) / rate``, where
``rate`` is how fast the queue moves (requests granted per second, measured from this process's
own granted waiters). When that exceeds ``fraction × max_wait`` it would most likely wait and
then be shed anyway (or be granted at the edge of ``max_wait`` and answered late), so the gate
sheds it at once with ``Retry-After``: the client learns in milliseconds, not after ``max_wait``.
"""

from __future__ import annotations

import math
from typing import Literal

EarlyShed = Literal["queue_full", "expected_wait"]


def ahead_limit(queue_rate_rps: float | None, max_wait_s: float, fraction: float) -> float | None:
    """The most requests that may be ahead of a new one in the queue: with more ahead, its
    expected wait ``(ahead + 1) / queue_rate_rps`` exceeds ``fraction × max_wait_s``.

    ``None`` (no limit, queue it: ``max_wait`` still bounds it) when the policy is off
    (``fraction <= 0``) or the rate is not known yet.
    """
    if fraction <= 0.0 or max_wait_s <= 0.0:
        return None
    if queue_rate_rps is None or not math.isfinite(queue_rate_rps) or queue_rate_rps <= 0.0:
        return None
    return fraction * max_wait_s * queue_rate_rps - 1.0


def ahead_now(ahead_then: float, granted_since: int) -> float:
    """Requests still ahead after ``granted_since`` grants (fleet-wide, counted on the grant
    channel) since ``ahead_then`` were: arrivals of a better priority since can only add to
    it, places given up only take from it."""
    return max(0.0, ahead_then - max(0, granted_since))


def early_shed(position: float, max_queue: int, limit: float | None) -> EarlyShed | None:
    """Shed a request before asking Redis? ``position`` is a lower bound on how many requests
    will be queued ahead of it (< 0: it may find a free slot; then Redis decides).

    ``queue_full`` when even that bound fills the queue (``max_queue``; with ``max_queue`` 0
    there is no queue, so a certainly full fleet is enough), ``expected_wait`` when it is over
    the expected-wait ``limit`` (``ahead_limit``), else None.
    """
    if position < 0:
        return None
    if position >= max_queue:
        return "queue_full"
    if limit is not None and position > limit:
        return "expected_wait"
    return None
