"""The request-end hooks are really called by LiteLLM's proxy (its capability detection)."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
from litellm.proxy.utils import ProxyLogging

from plugins.admission.hook import AdmissionHook
from plugins.admission.settings import AdmissionSettings
from plugins.routing.hook import RoutingHook
from plugins.routing.settings import RoutingSettings


@pytest.fixture
def hooks() -> list[object]:
    url = "redis://127.0.0.1:1/0"  # never connected to here
    return [
        RoutingHook(RoutingSettings(redis_url=url)),
        AdmissionHook(AdmissionSettings(redis_url=url)),
    ]


def test_proxy_runs_the_streaming_iterator_and_headers_hooks_of_both_plugins(
    hooks: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    import litellm

    monkeypatch.setattr(litellm, "callbacks", hooks)
    caps = ProxyLogging.callback_capabilities()
    assert [type(cb) for cb, kind in caps.iterator_overrides if kind == "override"] == [
        RoutingHook,
        AdmissionHook,
    ]
    assert caps.has_post_call_response_headers


async def test_a_failed_attempt_does_not_end_the_request(hooks: list[object]) -> None:
    """LiteLLM logs a failure event for every failed attempt while the router may retry: the
    admission ticket stays held (it used to be freed, and the gate over-admitted by one per
    retrying request); the final failure hook ends it."""
    from plugins.request_ticket import Admission

    admission = hooks[1]
    assert isinstance(admission, AdmissionHook)
    controller = admission.controller
    controller.book.open("call-1").admission = Admission(controller, "m", ("r",), local=True)
    controller.local["m"] = 1
    kwargs = {"litellm_call_id": "call-1", "model_info": {"id": "r"}}
    await admission.async_log_failure_event(kwargs, None, None, None)
    assert controller.holds("call-1")
    await admission.async_post_call_failure_hook(kwargs, RuntimeError("refused"), None)  # type: ignore[arg-type]
    assert not controller.holds("call-1") and controller.local["m"] == 0
