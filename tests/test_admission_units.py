"""Pure parts of admission: the Retry-After policy's shape, headers, envelope, settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plugins.admission.errors import ShedReason, overloaded
from plugins.admission.expected_wait import ahead_limit, ahead_now
from plugins.admission.retry_after import (
    RetryAfterBand,
    RetryPromises,
    retry_after_headers,
    retry_after_s,
)
from plugins.admission.settings import AdmissionSettings

BAND = RetryAfterBand(min_s=1.0, max_s=30.0, unknown_drain_s=5.0)


def test_more_work_ahead_waits_longer() -> None:
    waits = [retry_after_s(work, 4.0, BAND) for work in (8, 16, 32, 64)]
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert waits[1] == pytest.approx(4.0)  # 16 requests at 4/s


def test_faster_drain_waits_less() -> None:
    waits = [retry_after_s(40, drain, BAND) for drain in (2.0, 4.0, 8.0, 16.0)]
    assert waits == sorted(waits, reverse=True) and waits[0] > waits[-1]


def test_clamped_to_the_band() -> None:
    assert retry_after_s(1, 1000.0, BAND) == 1.0
    assert retry_after_s(10_000, 1.0, BAND) == 30.0


@pytest.mark.parametrize("drain", [None, 0.0, -1.0, float("nan"), float("inf")])
def test_unknown_drain_gives_the_documented_default(drain: float | None) -> None:
    assert retry_after_s(10, drain, BAND) == 5.0


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError):
        retry_after_s(-1, 1.0, BAND)
    with pytest.raises(ValueError):
        RetryAfterBand(min_s=5, max_s=1)


def test_expected_wait_limit_shape() -> None:
    # at the limit, the expected wait (ahead + 1) / rate is exactly fraction x max_wait
    limit = ahead_limit(5.0, 10.0, 0.8)
    assert limit is not None and (limit + 1) / 5.0 == pytest.approx(8.0)
    faster = [ahead_limit(rate, 10.0, 0.8) for rate in (1.0, 2.0, 4.0, 8.0)]
    assert faster == sorted(faster) and faster[0] < faster[-1]  # a faster queue holds more
    longer = [ahead_limit(4.0, wait, 0.8) for wait in (1.0, 5.0, 10.0)]
    assert longer == sorted(longer) and longer[0] < longer[-1]  # a longer max_wait too
    assert ahead_limit(4.0, 10.0, 0.5) < ahead_limit(4.0, 10.0, 1.0)  # type: ignore[operator]


@pytest.mark.parametrize("rate", [None, 0.0, -2.0, float("nan"), float("inf")])
def test_expected_wait_unknown_rate_or_off_means_no_limit(rate: float | None) -> None:
    assert ahead_limit(rate, 10.0, 0.8) is None
    assert ahead_limit(4.0, 10.0, 0.0) is None  # the policy off
    assert ahead_limit(4.0, 0.0, 0.8) is None  # no waiting at all: the queue limits decide


def test_the_queue_moves_on_by_the_grants_seen() -> None:
    assert ahead_now(10.0, 0) == 10.0
    assert ahead_now(10.0, 3) == 7.0
    assert ahead_now(10.0, 60) == 0.0
    assert ahead_now(10.0, -1) == 10.0  # a counter reset moves nothing


def test_headers_integer_seconds_rounded_up_and_precise_ms() -> None:
    assert retry_after_headers(2.2) == {"Retry-After": "3", "retry-after-ms": "2200"}
    assert retry_after_headers(0.2) == {"Retry-After": "1", "retry-after-ms": "200"}


def test_envelope() -> None:
    exc = overloaded("m", ShedReason.QUEUE_TIMEOUT, 4.0, wait="2.0 s")
    assert exc.status_code == 503 and int(exc.code) == 503
    body = exc.to_dict()
    assert body["code"] == "queue_timeout" and body["type"] == "service_unavailable"
    assert body["param"] is None and "retry after 4.0 s" in str(body["message"])
    assert exc.headers == {"Retry-After": "4", "retry-after-ms": "4000"}


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValidationError, match="redis_url"):
        AdmissionSettings()  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="max_queue"):
        AdmissionSettings(redis_url="redis://127.0.0.1:1/0", max_queue=-1)
    with pytest.raises(ValidationError, match="min_s"):
        AdmissionSettings(redis_url="redis://127.0.0.1:1/0", retry_after_min_s=40)
    with pytest.raises(ValidationError, match="expected_wait_fraction"):
        AdmissionSettings(redis_url="redis://127.0.0.1:1/0", expected_wait_fraction=1.5)


def test_priority_queue_limits() -> None:
    s = AdmissionSettings(
        redis_url="redis://127.0.0.1:1/0", max_queue=10, priority_max_queue={2: 3}
    )
    assert (s.queue_limit(1), s.queue_limit(2)) == (10, 3)


def test_retry_promises_spread_a_burst_at_the_drain_rate() -> None:
    """A burst turned away at once: the k-th client is told to come back behind the k - 1
    before it, so they return spread at the rate slots free, not all together."""
    promises = RetryPromises()
    waits = []
    for _ in range(5):
        waits.append(retry_after_s(4 + promises.pending(100.0, 2.0), 2.0, BAND))
        promises.add(100.0, 2.0)
    assert waits == [2.0, 2.5, 3.0, 3.5, 4.0]  # (4 ahead + k - 1) / 2 per second
    # they come back at the drain rate: 2 s later, 4 of the 5 are expected back
    assert promises.pending(102.0, 2.0) == pytest.approx(1.0)
    assert promises.pending(200.0, 2.0) == 0.0
    assert promises.pending(100.0, None) == 0.0  # no rate, nothing counted


def test_the_hook_notes_the_tokens_a_response_used_on_its_ticket() -> None:
    """Non-stream responses and a stream's last chunk carry ``usage.total_tokens``: the
    admission's fair share is corrected by them at the release."""
    from litellm.types.utils import ModelResponse, Usage

    from plugins.admission.hook import AdmissionHook
    from plugins.admission.settings import AdmissionSettings
    from plugins.request_ticket import TicketBook

    book = TicketBook()
    hook = AdmissionHook(AdmissionSettings(redis_url="redis://127.0.0.1:1"), book)
    ticket = book.open("c1")
    response = ModelResponse(usage=Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42))
    hook._note_usage("c1", response)
    assert ticket.usage_tokens == 42
    hook._note_usage("c1", {"usage": {"total_tokens": 7}})
    assert ticket.usage_tokens == 7
    hook._note_usage("c1", {"usage": None})  # nothing reported: the last count stays
    assert ticket.usage_tokens == 7


def test_a_requests_deadline_comes_from_its_header_else_its_tier() -> None:
    import pytest

    from plugins.admission.errors import GatewayError
    from plugins.admission.hook import request_deadline_ms

    def data(**headers: str) -> dict[str, object]:
        return {"proxy_server_request": {"headers": headers}}

    assert request_deadline_ms(data(), None) is None
    assert request_deadline_ms(data(), 2000) == 2000.0
    assert request_deadline_ms(data(**{"X-Triage-TTFT-Deadline-Ms": "750"}), 2000) == 750.0
    assert request_deadline_ms({}, 100) == 100.0  # no proxy_server_request (direct calls)
    for bad in ("soon", "0", "-5", "nan", "inf"):
        with pytest.raises(GatewayError) as info:
            request_deadline_ms(data(**{"x-triage-ttft-deadline-ms": bad}), None)
        assert info.value.status_code == 400
        body = info.value.to_dict()
        assert body["param"] == "x-triage-ttft-deadline-ms" and body["code"] == "invalid_header"
