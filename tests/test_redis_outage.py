"""The Redis-outage bookkeeping both plugins share (``plugins/redis_outage.py``): a retry window,
a count of fallback decisions, and logs that name the plugin and what it does meanwhile (the
admission plugin's outage used to be logged as "routing: ... routing by per-process counts")."""

from __future__ import annotations

import logging

import pytest

from plugins.redis_outage import RedisOutage


def test_retry_window_and_counts() -> None:
    outage = RedisOutage(500, 10.0, owner="routing", fallback="local counts", unit="picks")
    assert outage.should_try(0.0) and not outage.down
    outage.failed(ConnectionError("refused"), "a pick", now=1.0)
    assert outage.down and not outage.should_try(1.2) and outage.should_try(1.5)
    outage.fallbacks += 3
    outage.succeeded(now=2.0)
    assert not outage.down and outage.fallbacks == 0 and outage.should_try(2.0)


def test_logs_name_the_plugin_and_its_fallback(caplog: pytest.LogCaptureFixture) -> None:
    outage = RedisOutage(
        100, 0.0, owner="admission", fallback="admitting by a local bound", unit="admissions"
    )
    with caplog.at_level(logging.WARNING, logger="plugins.redis_outage"):
        outage.failed(ConnectionError("refused"), "admission of a m request", now=1.0)
        outage.fallbacks += 2
        outage.succeeded(now=4.0)
    down, back = (r.getMessage() for r in caplog.records)
    assert down.startswith("admission: redis unreachable during admission of a m request")
    assert "admitting by a local bound" in down and "routing" not in down
    assert back == (
        "admission: redis reachable again after 3.0 s; 2 admissions meanwhile: "
        "admitting by a local bound"
    )
