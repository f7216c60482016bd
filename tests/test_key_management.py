"""LiteLLM's key management routes on the offline key store (``plugins/auth/key_management.py``)
through the real proxy of the embedded stack: ``/key/generate`` -> a chat with the new key ->
its rpm limit -> 429 with ``retry-after`` (LiteLLM's limiter, as for its database keys);
``/key/info``, ``/key/update``; an expired key -> 401 ``expired_key``; a tpm limit;
``/key/delete`` -> 401. And the pure parts: which request fields the store refuses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from litellm.proxy._types import GenerateKeyRequest, UpdateKeyRequest

from devstack.stack import Stack
from plugins.auth.key_management import expiry, key_name, split_metadata, unsupported

MODEL = "standin"


def test_the_store_refuses_what_it_would_not_keep() -> None:
    assert unsupported(GenerateKeyRequest(key_alias="a", models=["m"], rpm_limit=3)) == []
    assert unsupported(GenerateKeyRequest(models=[], metadata={}, spend=0)) == []  # defaults
    assert unsupported(GenerateKeyRequest(max_budget=10.0, team_id="t")) == [
        "max_budget",
        "team_id",
    ]
    assert unsupported(UpdateKeyRequest(key="sk-1", tpm_limit=5)) == []
    assert split_metadata({"priority": 2, "team": "a", "key_id": "x"}) == (2, {"team": "a"})
    with pytest.raises(Exception, match="priority"):
        split_metadata({"priority": "high"})
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert expiry("90s", now) == datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC)
    assert expiry(None, now) is None and expiry("-1", now) is None
    assert key_name("sk-triage-abcdef123456") == "sk-...3456"


@pytest.fixture(scope="module")
def stack(small_stack: Stack) -> Stack:
    return small_stack


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    base = stack.proxies[0].base_url
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {stack.master_key}"}, timeout=30
    ) as client:
        yield client


def chat(stack: Stack, key: str, max_tokens: int = 3) -> httpx.Response:
    return httpx.post(
        f"{stack.proxies[0].base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
        },
        timeout=30,
    )


def test_generate_chat_rpm_limit_info_update_delete(stack: Stack, admin: httpx.Client) -> None:
    made = admin.post(
        "/key/generate",
        json={
            "key_alias": "rpm-two",
            "models": [MODEL],
            "rpm_limit": 2,
            "max_parallel_requests": 4,
            "metadata": {"priority": 3, "team": "search"},
        },
    )
    assert made.status_code == 200, made.text
    body = made.json()
    key = body["key"]
    assert key.startswith("sk-") and body["key_alias"] == "rpm-two"
    assert (body["rpm_limit"], body["max_parallel_requests"], body["models"]) == (2, 4, [MODEL])
    assert body["metadata"] == {"priority": 3, "team": "search"} and body["expires"] is None
    assert body["key_name"] == f"sk-...{key[-4:]}"

    assert chat(stack, key).status_code == 200
    assert chat(stack, key).status_code == 200
    limited = chat(stack, key)
    assert limited.status_code == 429, limited.text
    assert float(limited.headers["retry-after"]) > 0
    assert limited.json()["error"]["message"]

    info = admin.get("/key/info", params={"key": key})
    assert info.status_code == 200, info.text
    assert info.json()["info"]["rpm_limit"] == 2 and info.json()["info"]["key_alias"] == "rpm-two"
    token = info.json()["info"]["token"]
    assert admin.get("/key/info", params={"key": token}).json()["info"]["key_alias"] == "rpm-two"

    updated = admin.post(
        "/key/update", json={"key": key, "rpm_limit": 100, "metadata": {"priority": 5}}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["rpm_limit"] == 100 and updated.json()["metadata"] == {"priority": 5}
    assert chat(stack, key).status_code == 200  # the new limit, at once in this proxy

    deleted = admin.post("/key/delete", json={"keys": [key]})
    assert deleted.status_code == 200 and deleted.json() == {"deleted_keys": [key]}
    gone = chat(stack, key)
    assert gone.status_code == 401, gone.text
    assert admin.get("/key/info", params={"key": key}).status_code == 404


def test_expiry_tpm_limit_and_refusals(stack: Stack, admin: httpx.Client) -> None:
    short = admin.post("/key/generate", json={"duration": "2s"}).json()
    assert datetime.fromisoformat(short["expires"]) > datetime.now(UTC)
    assert chat(stack, short["key"]).status_code == 200
    time.sleep(2.2)
    expired = chat(stack, short["key"])
    assert expired.status_code == 401 and expired.json()["error"]["type"] == "expired_key"

    tokens = admin.post("/key/generate", json={"tpm_limit": 60}).json()
    answers = []
    for _ in range(12):  # ~20 tokens each (prompt and answer): the limit is reached early
        answers.append(chat(stack, tokens["key"], max_tokens=5))
        if answers[-1].status_code == 429:
            break
    assert answers[0].status_code == 200, answers[0].text
    assert answers[-1].status_code == 429 and float(answers[-1].headers["retry-after"]) > 0

    assert admin.post("/key/generate", json={"key": "abc"}).status_code == 400  # not sk-...
    chosen = admin.post("/key/generate", json={"key": "sk-chosen-0123456789"})
    assert chosen.status_code == 200 and chosen.json()["key"] == "sk-chosen-0123456789"
    assert admin.post("/key/generate", json={"key": "sk-chosen-0123456789"}).status_code == 400
    blocked = admin.post("/key/update", json={"key": "sk-chosen-0123456789", "rpm_limit": 0})
    assert blocked.status_code == 200 and blocked.json()["rpm_limit"] == 0  # 0 is a limit
    assert chat(stack, "sk-chosen-0123456789").status_code == 429  # LiteLLM's: blocked
    by_alias = admin.post("/key/delete", json={"key_aliases": [chosen.json()["key_alias"]]})
    assert by_alias.status_code == 200
    assert admin.post("/key/delete", json={"key_aliases": ["no-such-alias"]}).status_code == 404

    refused = admin.post("/key/generate", json={"max_budget": 10})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_budget"
    assert admin.post("/key/generate", json={"key_alias": tokens["key_alias"]}).status_code == 400
    assert admin.post("/key/delete", json={"keys": ["sk-unknown"]}).status_code == 404
    assert stack.api_key is not None
    denied = httpx.post(
        f"{stack.proxies[0].base_url}/key/generate",
        headers={"Authorization": f"Bearer {stack.api_key}"},
        json={},
        timeout=10,
    )
    assert denied.status_code == 403


def test_a_keys_own_rate_limit_is_not_an_upstream_overflow() -> None:
    """LiteLLM's limiter answers a key over its rpm/tpm with ``ProxyRateLimitError`` (a 429
    that is also a ``RateLimitError``): the key's limit, not a full replica, so the admission
    plugin must not turn it into a 503 ``upstream_overloaded``."""
    from litellm import RateLimitError
    from litellm.proxy.common_utils.proxy_rate_limit_error import ProxyRateLimitError

    from plugins.overflow import is_upstream_overflow

    limited = ProxyRateLimitError(detail="over rpm", headers={"retry-after": "60"})
    assert not is_upstream_overflow(limited)
    assert is_upstream_overflow(RateLimitError("replica full", "triage_triton", "m"))


def test_the_routes_give_way_to_litellms_own_with_database_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Put ahead of LiteLLM's routes, they match only while the offline store is the proxy's
    ``custom_auth``: with LiteLLM's database keys its own ``/key/*`` routes answer."""
    from fastapi import FastAPI
    from litellm.proxy import proxy_server
    from starlette.routing import Match

    from plugins.auth.custom_auth import user_api_key_auth
    from plugins.auth.key_management import install_key_routes

    app = FastAPI()
    install_key_routes(app)
    (route,) = [r for r in app.router.routes if getattr(r, "path", "") == "/key/generate"]
    scope = {"type": "http", "path": "/key/generate", "method": "POST", "root_path": ""}
    monkeypatch.setattr(proxy_server, "user_custom_auth", None, raising=False)
    assert route.matches(scope)[0] == Match.NONE
    monkeypatch.setattr(proxy_server, "user_custom_auth", user_api_key_auth, raising=False)
    assert route.matches(scope)[0] == Match.FULL
