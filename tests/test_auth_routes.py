"""Every route family an ordinary key (a virtual key of the offline key store) may call, through
the real proxy: the OpenAI SDK's answers, one error envelope, no replica address, no traceback.

One stack (one Triton stand-in replica, one proxy); three keys: an ordinary one (every model),
one restricted to a model no deployment serves, and the master key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from devstack.stack import Stack
from plugins.auth.keystore import KeyStore

from proxy_helpers import MESSAGES, sdk

pytestmark = pytest.mark.integration

MODEL = "standin"
REPLICA_ADDRESS = "http://127.0.0.1"
ENVELOPE = {"message", "type", "param", "code"}
LEAKS = ("Traceback", 'File "', "site-packages", ".py", REPLICA_ADDRESS)


@dataclass(frozen=True)
class Keys:
    ordinary: str
    restricted: str
    """A key for the model ``elsewhere`` only (served by no deployment here)."""
    master: str


@pytest.fixture(scope="module")
def stack(small_stack: Stack) -> Stack:
    return small_stack


@pytest.fixture(scope="module")
def keys(stack: Stack) -> Keys:
    async def create() -> str:
        assert stack.redis is not None
        store = KeyStore(
            Redis.from_url(stack.redis.url), stack.settings.key_prefix, owns_client=True
        )
        try:
            key, _ = await store.create(f"restricted-{time.time_ns()}", models=["elsewhere"])
        finally:
            await store.aclose()
        return key

    assert stack.api_key is not None
    return Keys(stack.api_key, asyncio.run(create()), stack.master_key)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.proxies[0].base_url, timeout=60.0) as http:
        yield http


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI envelope of an error answer, checked: status, JSON, exactly the four fields."""
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ENVELOPE, body
    return dict(body["error"])


INFERENCE: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2},
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/v1/embeddings": {"input": "hello"},
    "/v1/responses": {"input": "hello", "max_output_tokens": 2},
    "/v1/messages": {"messages": MESSAGES, "max_tokens": 2},
}


async def test_sdk_retrieves_a_model_as_listed(stack: Stack, keys: Keys) -> None:
    """Row 1: ``client.models.retrieve`` with an ordinary key (was 403 "needs the master key")."""
    client = sdk(stack)
    listed = {m.id: m for m in (await client.models.list()).data}
    model = await client.models.retrieve(MODEL)
    assert (model.id, model.object, model.created) == (MODEL, "model", listed[MODEL].created)
    assert model.model_extra == listed[MODEL].model_extra  # max_output_tokens
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.models.retrieve("no-such-model")
    assert isinstance(unknown.value.body, dict) and set(unknown.value.body) == ENVELOPE
    assert unknown.value.code == "model_not_found"
    restricted = client.with_options(api_key=keys.restricted)
    assert (await restricted.models.list()).data == []  # neither lists nor retrieves it
    with pytest.raises(openai.NotFoundError) as hidden:
        await restricted.models.retrieve(MODEL)
    assert hidden.value.code == "model_not_found"


async def test_one_envelope_on_every_route(client: httpx.AsyncClient, keys: Keys) -> None:
    """Row 2: 401, 403 and 404 of every route family an ordinary key may call."""
    for path, body in INFERENCE.items():
        no_key = error_of(await client.post(path, json={"model": MODEL, **body}), 401)
        assert no_key["type"] == "auth_error"
        forbidden = await client.post(
            path, json={"model": MODEL, **body}, headers=auth(keys.restricted)
        )
        assert error_of(forbidden, 403)["type"] == "key_model_access_denied", path
        unknown = await client.post(
            path, json={"model": "no-such-model", **body}, headers=auth(keys.ordinary)
        )
        assert error_of(unknown, 404)["code"] == "model_not_found", path
    for path in ("/v1/models", "/v1/models/standin", "/model/info", "/v1/model/info"):
        assert error_of(await client.get(path), 401)["code"] == "401"
    hidden = await client.get("/v1/models/standin", headers=auth(keys.restricted))
    assert error_of(hidden, 404)["code"] == "model_not_found"
    unknown_id = await client.get(
        "/model/info", params={"litellm_model_id": "nope"}, headers=auth(keys.ordinary)
    )
    assert error_of(unknown_id, 400)["param"] == "litellm_model_id"
    for path in ("/engines/standin/chat/completions", "/v1/images/generations", "/key/list"):
        method = client.get if path == "/key/list" else client.post
        refused = await method(path, headers=auth(keys.ordinary))
        assert error_of(refused, 403)["param"] == "route"


async def test_replica_addresses_are_for_the_master_key(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    """Row 3: ``/model/info`` shows names and limits to a key, ``api_base`` to the admin only;
    nor does a completion's ``x-litellm-model-api-base`` header give it away."""
    for path in ("/model/info", "/v1/model/info"):
        seen = await client.get(path, headers=auth(keys.ordinary))
        assert seen.status_code == 200
        assert REPLICA_ADDRESS not in seen.text
        (row,) = seen.json()["data"]
        assert row["model_name"] == MODEL
        assert row["model_info"]["max_output_tokens"] == 4096
        assert row["litellm_params"] == {"model": f"triage_triton/{MODEL}"}
        admin = await client.get(path, headers=auth(keys.master))
        assert admin.json()["data"][0]["litellm_params"]["api_base"].startswith(REPLICA_ADDRESS)
    one = await client.get(
        "/model/info", params={"litellm_model_id": "replica-0"}, headers=auth(keys.ordinary)
    )
    assert one.status_code == 200 and REPLICA_ADDRESS not in one.text
    body = {"model": MODEL, **INFERENCE["/v1/chat/completions"]}
    for key, shown in ((keys.ordinary, False), (keys.master, True)):
        answer = await client.post("/v1/chat/completions", json=body, headers=auth(key))
        assert answer.status_code == 200
        header = answer.headers.get("x-litellm-model-api-base", "")
        assert header.startswith(REPLICA_ADDRESS) is shown


async def test_docs_and_admin_ui_are_not_public(client: httpx.AsyncClient, keys: Keys) -> None:
    """Row 4: no API docs without a key, the admin UI off, no password form takes the master
    key; the liveness probe stays open."""
    for path in ("/", "/docs", "/redoc", "/openapi.json"):
        assert (await client.get(path)).status_code in (401, 404), path
    ui = (await client.get("/.well-known/litellm-ui-config")).json()
    assert ui["admin_ui_disabled"] is True
    login = await client.post("/login", data={"username": "admin", "password": keys.master})
    assert login.status_code == 401
    assert "set-cookie" not in login.headers
    assert (await client.get("/health/liveliness")).status_code == 200


async def test_error_bodies_hold_no_python_internals(client: httpx.AsyncClient, keys: Keys) -> None:
    """Row 5: malformed bodies on the routes the front door does not check (LiteLLM answered
    ``/v1/responses`` with ``input: [5]`` by a 400 holding the traceback and file paths)."""
    bad = (
        ("/v1/responses", {"input": [5]}, 400),
        ("/v1/responses", {"input": 12}, None),
        ("/v1/embeddings", {"input": {"not": "text"}}, None),
        ("/v1/embeddings", {"input": [[1, "x"]]}, None),
        ("/v1/messages", {"messages": "hello", "max_tokens": 2}, None),
        ("/v1/messages", {"messages": [5], "max_tokens": 2}, None),
    )
    for path, body, status in bad:
        answer = await client.post(path, json={"model": MODEL, **body}, headers=auth(keys.ordinary))
        assert answer.status_code >= 400, (path, body)
        if status is not None:
            error_of(answer, status)
        for leak in LEAKS:
            assert leak not in answer.text, (path, body, answer.text)
