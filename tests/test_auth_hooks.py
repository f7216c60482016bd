"""custom_auth, the model-access hook, identity and ``triage keys``, against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException
from litellm.constants import LITELLM_PROXY_MASTER_KEY_ALIAS
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth
from redis.asyncio import Redis
from starlette.requests import Request

from core.paths import free_port
from devstack.redis_launcher import RedisServer
from plugins.auth import custom_auth
from plugins.auth import model_access as model_access_module
from plugins.auth.cli import main
from plugins.auth.custom_auth import Authenticator, set_authenticator, user_api_key_auth
from plugins.auth.disclosure import (
    DisclosureHook,
    public_deployment,
    public_model_info,
    scrubbed_client_message,
)
from plugins.auth.identity import KEY_SOURCE, Flow, flow_of, key_id_of, priority_of
from plugins.auth.keystore import KeyStore, hash_key
from plugins.auth.model_access import ModelAccessHook, model_access, model_allowed, model_served
from plugins.auth.routes import (
    body_model,
    key_route_allowed,
    names_model_in_body,
    retrieved_model,
    route_family,
)
from plugins.auth.settings import KeysSettings
from plugins.proxy_config import (
    ADMISSION_CALLBACK,
    DISCLOSURE_CALLBACK,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
)

MASTER_KEY = "sk-triage-master-" + uuid.uuid4().hex
TTL_S = 0.3


def fresh_prefix() -> str:
    return f"test-auth-{uuid.uuid4().hex[:8]}:"


def http_request(
    path: str = "/chat/completions", body: dict[str, Any] | None = None, method: str = "POST"
) -> Request:
    raw = json.dumps(body if body is not None else {}).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"content-type", b"application/json")]
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    return Request(scope, receive)


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRIAGE_KEYS_REDIS_URL", "TRIAGE_KEYS_KEY_PREFIX", "TRIAGE_STACK_STATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LITELLM_MASTER_KEY", MASTER_KEY)
    # no proxy router unless a test brings one (``served``): which models exist is unknown
    monkeypatch.setattr("plugins.auth.model_access.proxy_router", lambda: None)


@pytest.fixture
async def auth(redis_server: RedisServer) -> AsyncIterator[Authenticator]:
    settings = KeysSettings(
        redis_url=redis_server.url,
        key_prefix=fresh_prefix(),
        cache_ttl_s=TTL_S,
        negative_cache_ttl_s=0,
    )
    authenticator = Authenticator.from_settings(settings)
    previous = set_authenticator(authenticator)
    try:
        yield authenticator
    finally:
        set_authenticator(previous)
        await authenticator.aclose()


async def rejected(
    api_key: str | None,
    path: str = "/chat/completions",
    body: dict[str, Any] | None = None,
    method: str = "POST",
) -> ProxyException:
    with pytest.raises(ProxyException) as info:
        await user_api_key_auth(http_request(path, body, method), api_key)  # type: ignore[arg-type]
    return info.value


# --- custom_auth -----------------------------------------------------------------------------


async def test_live_key_becomes_user_api_key_auth(auth: Authenticator) -> None:
    plaintext, record = await auth.store.create(
        "team-a", models=["m1"], priority=0, max_parallel_requests=2
    )
    for presented in (plaintext, f"Bearer {plaintext}"):
        user = await user_api_key_auth(http_request(), presented)
        assert isinstance(user, UserAPIKeyAuth)
        assert user.token == user.api_key == record.key_hash
        assert user.key_alias == "team-a"
        assert user.models == ["m1"]
        assert user.max_parallel_requests == 2
        assert user.user_role == LitellmUserRoles.INTERNAL_USER
        assert user.metadata == {"priority": 0, "key_id": record.key_id, "key_source": KEY_SOURCE}
        assert plaintext not in user.model_dump_json()


@pytest.mark.parametrize("presented", [None, "", "   ", "Bearer ", "bearer  "])
async def test_missing_key_is_401(auth: Authenticator, presented: str | None) -> None:
    exc = await rejected(presented)
    assert exc.code == "401"
    assert exc.type == "auth_error"
    assert "No API key" in exc.message
    assert set(exc.to_dict()) == {"message", "type", "param", "code"}


async def test_wrong_key_is_401(auth: Authenticator) -> None:
    await auth.store.create("someone")
    for wrong in ("sk-triage-wrong", "sk-1234", MASTER_KEY + "x", "not even sk"):
        exc = await rejected(wrong)
        assert (exc.code, exc.type) == ("401", "auth_error")
        assert wrong not in exc.message


async def test_revoked_key_is_401_after_the_cache_ttl(auth: Authenticator) -> None:
    plaintext, record = await auth.store.create("soon-gone")
    assert (await user_api_key_auth(http_request(), plaintext)).key_alias == "soon-gone"
    await auth.store.revoke(record.key_id)
    # still trusted from the in-process cache: no Redis round trip per request
    assert (await user_api_key_auth(http_request(), plaintext)).key_alias == "soon-gone"
    await asyncio.sleep(TTL_S + 0.05)
    exc = await rejected(plaintext)
    assert exc.code == "401"


async def test_new_key_is_accepted_at_once(auth: Authenticator) -> None:
    plaintext = "sk-triage-" + uuid.uuid4().hex
    await rejected(plaintext)  # unknown keys are not cached here (negative ttl 0)
    new_plaintext, _ = await auth.store.create("fresh")
    assert (await user_api_key_auth(http_request(), new_plaintext)).key_alias == "fresh"


async def test_keys_are_kept_to_model_routes(auth: Authenticator) -> None:
    plaintext, _ = await auth.store.create("routes")
    for path in ("/v1/chat/completions", "/embeddings", "/v1/models", "/model/info"):
        assert (await user_api_key_auth(http_request(path), plaintext)).key_alias == "routes"
    for path in (
        "/config/update",
        "/get/config/callbacks",
        "/key/generate",
        "/model/new",
        "/engines/m/chat/completions",  # LiteLLM's aliases skip the front door's validation
        "/v1/images/generations",
    ):
        exc = await rejected(plaintext, path)
        assert (exc.code, exc.type, exc.param) == ("403", "auth_error", "route")
        assert path in exc.message
        admin = await user_api_key_auth(http_request(path), MASTER_KEY)
        assert admin.user_role == LitellmUserRoles.PROXY_ADMIN

    auth.settings.restrict_routes = False
    assert (
        await user_api_key_auth(http_request("/config/update"), plaintext)
    ).key_alias == "routes"


async def test_master_key_is_the_admin(auth: Authenticator) -> None:
    for presented in (MASTER_KEY, f"Bearer {MASTER_KEY}"):
        admin = await user_api_key_auth(http_request("/key/generate"), presented)
        assert admin.user_role == LitellmUserRoles.PROXY_ADMIN
        assert admin.api_key == LITELLM_PROXY_MASTER_KEY_ALIAS
        assert MASTER_KEY not in admin.model_dump_json()
        assert key_id_of(admin) == "master"
        assert priority_of(admin) == 0


async def test_no_master_key_configured(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LITELLM_MASTER_KEY")
    assert (await rejected(MASTER_KEY)).code == "401"


async def test_redis_down_is_503_never_an_allow(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    down = KeysSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.2)
    authenticator = Authenticator.from_settings(down)
    previous = set_authenticator(authenticator)
    try:
        with caplog.at_level(logging.ERROR, logger="triage.auth"):
            exc = await rejected("sk-triage-anything")
        assert exc.code == "503"
        assert exc.headers.get("Retry-After") == "1"
        assert "key store" in exc.message
        assert "unreachable" in caplog.text
        assert hash_key("sk-triage-anything")[:12] in caplog.text
        # the master key needs no Redis
        admin = await user_api_key_auth(http_request(), MASTER_KEY)
        assert admin.user_role == LitellmUserRoles.PROXY_ADMIN
    finally:
        set_authenticator(previous)
        await authenticator.aclose()


@pytest.mark.parametrize("stale_if_error_s", [600.0, 0.0])
async def test_redis_outage_keeps_recently_valid_keys(
    tmp_path: Path, stale_if_error_s: float
) -> None:
    """A Redis outage must not lock every client out: a key seen valid recently stays valid."""
    server = RedisServer(tmp_path).start()
    settings = KeysSettings(
        redis_url=server.url,
        key_prefix=fresh_prefix(),
        cache_ttl_s=0.1,
        redis_timeout_s=0.2,
        stale_if_error_s=stale_if_error_s,
    )
    authenticator = Authenticator.from_settings(settings)
    previous = set_authenticator(authenticator)
    try:
        plaintext, _ = await authenticator.store.create("survivor")
        assert (await user_api_key_auth(http_request(), plaintext)).key_alias == "survivor"
        await asyncio.sleep(0.15)  # the cached lookup has expired
        server.kill()
        if stale_if_error_s:
            assert (await user_api_key_auth(http_request(), plaintext)).key_alias == "survivor"
        else:
            assert (await rejected(plaintext)).code == "503"
        assert (await rejected("sk-triage-never-seen")).code == "503"  # never an allow
    finally:
        set_authenticator(previous)
        await authenticator.aclose()
        server.stop()


async def test_authenticator_is_made_once_from_the_env(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = fresh_prefix()
    monkeypatch.setenv("TRIAGE_KEYS_REDIS_URL", redis_server.url)
    monkeypatch.setenv("TRIAGE_KEYS_KEY_PREFIX", prefix)
    previous = set_authenticator(None)
    store = KeyStore(Redis.from_url(redis_server.url), prefix, owns_client=True)
    try:
        plaintext, _ = await store.create("from-env")
        assert (await user_api_key_auth(http_request(), plaintext)).key_alias == "from-env"
        first = custom_auth.get_authenticator()
        assert custom_auth.get_authenticator() is first
        assert first.settings.key_prefix == prefix
        assert first.settings.cache_ttl_s == 5.0
    finally:
        made = set_authenticator(previous)
        if made is not None:
            await made.aclose()
        await store.aclose()


async def test_unconfigured_store_is_500(caplog: pytest.LogCaptureFixture) -> None:
    previous = set_authenticator(None)
    try:
        with caplog.at_level(logging.ERROR, logger="triage.auth"):
            exc = await rejected("sk-triage-anything")
        assert exc.code == "500"
        assert "TRIAGE_KEYS_REDIS_URL" in caplog.text
    finally:
        set_authenticator(previous)


# --- model access ----------------------------------------------------------------------------


async def keystore_user(auth: Authenticator, models: list[str]) -> UserAPIKeyAuth:
    plaintext, _ = await auth.store.create(f"ma-{uuid.uuid4().hex[:6]}", models=models)
    return await user_api_key_auth(http_request(), plaintext)


async def pre_call(user: UserAPIKeyAuth, model: str | None) -> Any:
    data: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        data["model"] = model
    return await model_access.async_pre_call_hook(
        user_api_key_dict=user,
        cache=None,  # type: ignore[arg-type]  # unused by the hook
        data=data,
        call_type="acompletion",
    )


async def test_disallowed_model_is_403(auth: Authenticator) -> None:
    user = await keystore_user(auth, ["allowed-a", "allowed-b"])
    with pytest.raises(ProxyException) as info:
        await pre_call(user, "forbidden-model")
    body = {"error": info.value.to_dict()}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "403"
    assert body["error"]["type"] == "key_model_access_denied"
    assert body["error"]["param"] == "model"
    assert "forbidden-model" in body["error"]["message"]
    assert "allowed-a" in body["error"]["message"]


async def test_allowed_or_unrestricted_model_passes(auth: Authenticator) -> None:
    restricted = await keystore_user(auth, ["allowed-a", "llama-*"])
    assert await pre_call(restricted, "allowed-a") is None
    assert await pre_call(restricted, "llama-3-8b") is None
    assert await pre_call(restricted, None) is None  # nothing to check
    unrestricted = await keystore_user(auth, [])
    assert await pre_call(unrestricted, "anything") is None


async def test_database_keys_are_left_to_litellm() -> None:
    db_key = UserAPIKeyAuth(api_key="sk-db-key", models=["my-access-group"])
    assert await pre_call(db_key, "model-in-the-group") is None


async def test_listing_hides_disallowed_models(auth: Authenticator) -> None:
    user = await keystore_user(auth, ["a", "c"])
    assert list(await model_access.async_filter_listed_models(user, ["a", "b", "c"])) == ["a", "c"]
    db_key = UserAPIKeyAuth(api_key="sk-db-key", models=["a"])
    assert list(await model_access.async_filter_listed_models(db_key, ["a", "b"])) == ["a", "b"]


def test_hook_is_registered_the_way_litellm_looks_for_it() -> None:
    assert isinstance(model_access, ModelAccessHook)
    assert "async_pre_call_hook" in vars(ModelAccessHook)  # LiteLLM skips inherited no-ops


@pytest.mark.parametrize(
    ("model", "allowed", "expected"),
    [
        ("m", [], True),
        ("m", ["m"], True),
        ("m", ["n"], False),
        ("m", ["*"], True),
        ("m", ["all-proxy-models"], True),
        ("llama-3", ["llama-*"], True),
        ("mistral", ["llama-*"], False),
        ("M", ["m"], False),
    ],
)
def test_model_allowed(model: str, allowed: list[str], expected: bool) -> None:
    assert model_allowed(model, allowed) is expected


# --- routes, and the model a request names -------------------------------------------------


@pytest.mark.parametrize(
    ("route", "family"),
    [
        ("/v1/chat/completions", "chat/completions"),
        ("/chat/completions", "chat/completions"),
        ("/v1/completions", "completions"),
        ("/embeddings", "embeddings"),
        ("/v1/responses", "responses"),
        ("/openai/v1/responses", "responses"),
        ("/v1/responses/resp_1/input_items", "responses"),
        ("/v1/messages", "messages"),
        ("/v1/messages/count_tokens", "messages"),
        ("/v1/models", "models"),
        ("/v1/models/standin", "models"),
        ("/models/standin", "models"),
        ("/model/info", "model/info"),
        ("/v1/model/info", "model/info"),
        ("/model_group/info", "model/info"),
        ("/engines/m/chat/completions", None),
        ("/openai/deployments/m/chat/completions", None),
        ("/cursor/chat/completions", None),
        ("/v1/images/generations", None),
        ("/v2/model/info", None),
        ("/v1/models/a/b", None),
        ("/anthropic/v1/messages", None),
        ("/key/generate", None),
        ("/", None),
    ],
)
def test_route_families(route: str, family: str | None) -> None:
    assert route_family(route) == family
    assert key_route_allowed(route) is (family is not None)


def test_model_of_a_request() -> None:
    assert retrieved_model("/v1/models/standin") == "standin"
    assert retrieved_model("/models/llama-3.1") == "llama-3.1"
    assert retrieved_model("/v1/models") is None
    assert names_model_in_body("/v1/chat/completions", "POST")
    assert names_model_in_body("/v1/messages/count_tokens", "post")
    assert not names_model_in_body("/v1/responses/resp_1/cancel", "POST")
    assert not names_model_in_body("/v1/chat/completions", "GET")
    assert body_model({"model": "m"}) == "m"
    for body in ({"model": ""}, {"model": ["m"]}, {}, ["m"], "m", None):
        assert body_model(body) is None


class FakeRouter:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def get_model_list(
        self, model_name: str | None = None, team_id: str | None = None
    ) -> list[dict[str, Any]]:
        return [{"model_name": model_name}] if model_name in self.names else []


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The models the (fake) proxy router serves."""
    names = {"standin", "other"}
    monkeypatch.setattr(model_access_module, "proxy_router", lambda: FakeRouter(names))
    return names


INFERENCE_ROUTES = (
    "/v1/chat/completions",
    "/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
)


def envelope(exc: ProxyException) -> dict[str, Any]:
    error = exc.to_dict()
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_model_is_checked_at_authentication(auth: Authenticator, served: set[str]) -> None:
    """Before LiteLLM's handler: ``/v1/messages`` answers in the same envelope as the rest."""
    restricted, _ = await auth.store.create("only-standin", models=["standin"])
    anyone, _ = await auth.store.create("any-model")
    for path in INFERENCE_ROUTES:
        ok = await user_api_key_auth(http_request(path, {"model": "standin"}), restricted)
        assert ok.key_alias == "only-standin"
        denied = envelope(await rejected(restricted, path, {"model": "other"}))
        assert (denied["code"], denied["type"], denied["param"]) == (
            "403",
            "key_model_access_denied",
            "model",
        )
        for key in (anyone, MASTER_KEY):
            unknown = await rejected(key, path, {"model": "nope"})
            assert unknown.code == "404"
            assert envelope(unknown) == {
                "message": "model 'nope' does not exist on this gateway",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        # a missing or malformed model is LiteLLM's to answer
        assert (await user_api_key_auth(http_request(path, {}), anyone)).key_alias == "any-model"
        assert (await user_api_key_auth(http_request(path, {"model": 5}), anyone)).key_alias


async def test_retrieving_a_model_the_key_may_not_use_is_404(
    auth: Authenticator, served: set[str]
) -> None:
    """OpenAI answers ``models.retrieve`` of a model outside the key's reach as of a missing one."""
    restricted, _ = await auth.store.create("retrieve-only-other", models=["other"])
    anyone, _ = await auth.store.create("retrieve-any")
    for key in (anyone, MASTER_KEY):
        user = await user_api_key_auth(http_request("/v1/models/standin", method="GET"), key)
        assert user.key_alias in ("retrieve-any", "master")
    forbidden = await rejected(restricted, "/v1/models/standin", method="GET")
    missing = await rejected(restricted, "/v1/models/nope", method="GET")
    for exc, model in ((forbidden, "standin"), (missing, "nope")):
        assert exc.code == "404"
        error = envelope(exc)
        assert error["code"] == "model_not_found"
        assert error["message"] == (
            f"model {model!r} does not exist on this gateway or this API key may not use it"
        )
    assert (await rejected(anyone, "/v1/models/nope", method="GET")).code == "404"


async def test_outside_the_proxy_no_model_is_unknown(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_access_module, "proxy_router", lambda: None)
    anyone, _ = await auth.store.create("no-router")
    user = await user_api_key_auth(http_request("/v1/embeddings", {"model": "x"}), anyone)
    assert user.key_alias == "no-router"
    assert model_served("x") is None


async def test_listing_hides_models_no_deployment_serves(
    auth: Authenticator, served: set[str]
) -> None:
    """LiteLLM lists a key's ``models`` as given, served or not."""
    user = await keystore_user(auth, ["standin", "retired"])
    listed = await model_access.async_filter_listed_models(user, ["standin", "retired"])
    assert list(listed) == ["standin"]


# --- disclosure ------------------------------------------------------------------------------


def test_model_info_rows_without_addresses() -> None:
    row = {
        "model_name": "standin",
        "litellm_params": {
            "model": "triage_triton/standin",
            "api_base": "http://127.0.0.1:8000",
            "api_key": "sk-upstream",
            "aws_secret_access_key": "secret",
            "tpm": 100,
        },
        "model_info": {
            "id": "replica-0",
            "max_output_tokens": 4096,
            "api_base": "http://10.0.0.5:8000",
            "docs": "https://example.com/model",
        },
        "openai_client": "<AsyncOpenAI base_url=http://127.0.0.1:8000>",
    }
    public = public_deployment(row)
    assert public == {
        "model_name": "standin",
        "litellm_params": {"model": "triage_triton/standin", "tpm": 100},
        "model_info": {"id": "replica-0", "max_output_tokens": 4096},
    }
    assert public_model_info({"data": [row, "junk"]}) == {"data": [public]}
    assert public_model_info({"detail": "x"}) == {"data": []}


def attribute_error_with_traceback() -> Exception:
    """What LiteLLM raises for ``/v1/responses`` with ``input: [5]``: an ``APIConnectionError``
    whose text holds the traceback of the ``AttributeError`` it wraps."""
    try:
        getattr(5, "get")  # noqa: B009
    except AttributeError as inner:
        wrapped = RuntimeError(
            "litellm.APIConnectionError: 'int' object has no attribute 'get'\n"
            "Traceback (most recent call last):\n"
            '  File "/srv/.venv/lib/python3.11/site-packages/litellm/responses/main.py", '
            "line 1466, in responses\n    return transform(input)\n"
            "AttributeError: 'int' object has no attribute 'get'\n"
        )
        wrapped.__cause__ = inner
        return wrapped
    raise AssertionError("unreachable")


def test_client_messages_lose_tracebacks_and_paths() -> None:
    clean = scrubbed_client_message(attribute_error_with_traceback())
    assert (
        clean
        == "Invalid request format: litellm.APIConnectionError: 'int' object has no attribute 'get'"
    )
    assert scrubbed_client_message(ValueError("max_tokens must be an integer >= 1")) is None


async def test_failure_hook_replaces_a_leaking_error() -> None:
    hook = DisclosureHook()
    key = UserAPIKeyAuth(api_key="a" * 64, metadata={"key_id": "k1"})
    substitute = await hook.async_post_call_failure_hook({}, attribute_error_with_traceback(), key)
    assert isinstance(substitute, HTTPException) and isinstance(substitute, ProxyException)
    assert substitute.status_code == 400
    error = envelope(substitute)
    assert (error["code"], error["type"]) == ("400", "invalid_request_error")
    assert "Traceback" not in error["message"] and ".py" not in error["message"]
    plain = ProxyException(message="bad", type="invalid_request_error", param="x", code=400)
    assert await hook.async_post_call_failure_hook({}, plain, key) is None


async def test_replica_address_header_for_the_admin_only() -> None:
    hook = DisclosureHook()
    key = UserAPIKeyAuth(api_key="a" * 64, user_role=LitellmUserRoles.INTERNAL_USER)
    admin = UserAPIKeyAuth(
        api_key=LITELLM_PROXY_MASTER_KEY_ALIAS, user_role=LitellmUserRoles.PROXY_ADMIN
    )
    assert await hook.async_post_call_response_headers_hook({}, key, None) == {
        "x-litellm-model-api-base": ""
    }
    assert await hook.async_post_call_response_headers_hook({}, admin, None) is None
    for name in ("async_post_call_failure_hook", "async_post_call_response_headers_hook"):
        assert name in vars(DisclosureHook)  # LiteLLM skips inherited no-ops


# --- proxy config: what is public --------------------------------------------------------------


def test_proxy_config_closes_docs_ui_and_password_login() -> None:
    config = build_proxy_config("m", "m", [ReplicaEndpoint("r0", "http://127.0.0.1:1")])
    callbacks = config["litellm_settings"]["callbacks"]
    assert callbacks[-2:] == [DISCLOSURE_CALLBACK, "prometheus"]
    assert callbacks.index(ADMISSION_CALLBACK) < callbacks.index(DISCLOSURE_CALLBACK)
    assert config["general_settings"]["disable_env_credential_login"] is True
    env = proxy_env("redis://127.0.0.1:1/0", "p:", "sk-master")
    assert {k: env[k] for k in ("NO_DOCS", "NO_REDOC", "NO_OPENAPI", "DISABLE_ADMIN_UI")} == {
        "NO_DOCS": "True",
        "NO_REDOC": "True",
        "NO_OPENAPI": "True",
        "DISABLE_ADMIN_UI": "True",
    }
    with_docs = proxy_env("redis://127.0.0.1:1/0", "p:", "sk-master", api_docs=True)
    assert "NO_DOCS" not in with_docs and with_docs["DISABLE_ADMIN_UI"] == "True"


# --- identity --------------------------------------------------------------------------------


async def test_identity_of_a_keystore_key(auth: Authenticator) -> None:
    plaintext, record = await auth.store.create("ident", priority=3)
    user = await user_api_key_auth(http_request(), plaintext)
    assert priority_of(user) == 3
    assert key_id_of(user) == record.key_id == hash_key(plaintext)[:12]


def test_identity_of_a_database_key() -> None:
    raw = "sk-" + uuid.uuid4().hex
    db_key = UserAPIKeyAuth(api_key=raw, metadata={"priority": 2}, team_id="t1")
    assert db_key.token == hashlib.sha256(raw.encode()).hexdigest()
    assert priority_of(db_key) == 2
    assert key_id_of(db_key) == db_key.token[:12]  # the same rule as `triage keys list`

    from_team = UserAPIKeyAuth(api_key=raw, metadata={}, team_metadata={"priority": "0"})
    assert priority_of(from_team) == 0
    assert priority_of(UserAPIKeyAuth(api_key=raw)) == 1
    assert priority_of(UserAPIKeyAuth(api_key=raw), default=4) == 4


@pytest.mark.parametrize("bad", ["high", True, 10, -1, 1.5, [0]])
def test_unusable_priority_falls_back(bad: object) -> None:
    user = UserAPIKeyAuth(api_key="sk-x", metadata={"priority": bad}, team_metadata={"priority": 2})
    assert priority_of(user) == 2
    alone = UserAPIKeyAuth(api_key="sk-x", metadata={"priority": bad})
    assert priority_of(alone, default=5) == 5


def test_key_id_never_shows_an_unhashed_key() -> None:
    master = UserAPIKeyAuth(
        api_key=LITELLM_PROXY_MASTER_KEY_ALIAS, user_role=LitellmUserRoles.PROXY_ADMIN
    )
    assert key_id_of(master) == "master"
    assert key_id_of(UserAPIKeyAuth()) == "anonymous"
    raw = UserAPIKeyAuth(api_key="plain-secret-without-sk-prefix")  # LiteLLM keeps it as is
    assert key_id_of(raw) == hashlib.sha256(b"plain-secret-without-sk-prefix").hexdigest()[:12]


# --- triage keys -----------------------------------------------------------------------------


@pytest.fixture
def cli_store(redis_server: RedisServer) -> Iterator[list[str]]:
    yield ["--redis-url", redis_server.url, "--key-prefix", fresh_prefix()]


def lookup(redis_url: str, prefix: str, plaintext: str) -> Any:
    async def go() -> Any:
        store = KeyStore(Redis.from_url(redis_url), prefix, owns_client=True)
        try:
            return await store.lookup(plaintext)
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_cli_create_list_revoke(cli_store: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    create = ["create", "--alias", "cli-a", "--models", "m1,m2", "--priority", "0"]
    code = main([*create, "--max-parallel", "3", *cli_store])
    out, err = capsys.readouterr()
    assert code == 0, err
    plaintext = out.splitlines()[0]
    assert plaintext.startswith("sk-triage-")
    assert "shown only this once" in err
    record = lookup(cli_store[1], cli_store[3], plaintext)
    assert (record.alias, record.models, record.priority) == ("cli-a", ("m1", "m2"), 0)
    assert record.max_parallel_requests == 3
    assert record.key_id in out
    assert record.metadata == {}  # no fair-share fields: the key is its own flow, weight 1

    assert main([*cli_store, "create", "--alias", "cli-b", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["alias"] == "cli-b"
    assert created["key"].startswith("sk-triage-")

    assert main(["list", *cli_store]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["id", "alias", "models", "priority", "max_parallel", "created"]
    assert lines[1].split()[:5] == [record.key_id, "cli-a", "m1,m2", "0", "3"]
    assert lines[2].split()[:5] == [created["key_id"], "cli-b", "*", "1", "-"]
    assert plaintext not in table and created["key"] not in table

    assert main(["list", "--json", *cli_store]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["alias"] for k in listed] == ["cli-a", "cli-b"]
    assert all("key" not in k for k in listed)

    assert main(["revoke", "cli-a", *cli_store]) == 0
    assert record.key_id in capsys.readouterr().out
    assert main(["revoke", created["key_id"], *cli_store]) == 0
    capsys.readouterr()
    assert lookup(cli_store[1], cli_store[3], plaintext) is None
    assert main(["list", "--json", *cli_store]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert main(["revoke", "cli-a", *cli_store]) == 1
    assert "no key" in capsys.readouterr().err


def test_cli_refuses_duplicates_and_bad_values(
    cli_store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", "--alias", "twice", *cli_store]) == 0
    assert main(["create", "--alias", "twice", *cli_store]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["create", "--alias", "p", "--priority", "12", *cli_store]) == 2
    assert "invalid setting priority" in capsys.readouterr().err
    assert main(["create", "--alias", "bad alias", *cli_store]) == 2
    assert "invalid setting alias" in capsys.readouterr().err


def test_cli_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting redis_url" in err
    assert "--redis-url" in err
    assert main(["list", "--redis-url", "http://127.0.0.1:1"]) == 2
    assert "invalid setting redis_url" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_cli_redis_down_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://:pw-secret@127.0.0.1:{free_port()}/0"
    assert main(["list", "--redis-url", url]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the key store" in err
    assert "pw-secret" not in err


def test_cli_reads_a_running_stack(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = fresh_prefix()
    (tmp_path / "stack.json").write_text(
        json.dumps({"redis_url": redis_server.url, "key_prefix": prefix})
    )
    monkeypatch.setenv("TRIAGE_STACK_STATE", str(tmp_path))
    assert main(["create", "--alias", "stacked"]) == 0
    plaintext = capsys.readouterr().out.splitlines()[0]
    assert lookup(redis_server.url, prefix, plaintext).alias == "stacked"

    monkeypatch.setenv("TRIAGE_STACK_STATE", str(tmp_path / "missing.json"))
    assert main(["list"]) == 2
    assert "TRIAGE_STACK_STATE" in capsys.readouterr().err


async def test_a_busy_pool_is_503_busy_not_an_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.redis_client import PoolExhausted

    authenticator = Authenticator.from_settings(KeysSettings(redis_url=redis_server.url))

    async def busy(key_hash: str) -> None:
        raise PoolExhausted("no free connection among 64 after 5.00 s")

    monkeypatch.setattr(authenticator.store, "get", busy)
    previous = set_authenticator(authenticator)
    try:
        with caplog.at_level(logging.WARNING, logger="triage.auth"):
            exc = await rejected("sk-triage-anything")
        assert exc.code == "503" and exc.headers.get("Retry-After") == "1"
        assert "too busy" in exc.message
        assert "key store busy" in caplog.text and "unreachable" not in caplog.text
    finally:
        set_authenticator(previous)
        await authenticator.aclose()


def test_cli_create_with_a_tenant_weight_and_queue_bound(
    cli_store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The fair-share fields land in the key's metadata, where the admission gate reads them
    (``identity.flow_of``): keys of one tenant are one flow."""
    create = ["create", "--alias", "cli-t", "--tenant", "acme corp", "--weight", "2.5"]
    assert main([*create, "--max-queued", "4", *cli_store]) == 0
    plaintext = capsys.readouterr().out.splitlines()[0]
    record = lookup(cli_store[1], cli_store[3], plaintext)
    assert record.metadata == {"tenant": "acme corp", "weight": 2.5, "max_queued": 4}
    flow = flow_of(UserAPIKeyAuth(api_key=record.key_hash, metadata={
        **record.metadata, "key_id": record.key_id,
    }))  # fmt: skip
    assert flow == Flow("tenant:acme_corp", 2.5, 4)
    with pytest.raises(SystemExit):
        main(["create", "--alias", "cli-w", "--weight", "0", *cli_store])


def test_the_flow_of_a_key() -> None:
    """Tenant (key, then team metadata), else team id, else key id; bad fields ignored."""
    key = UserAPIKeyAuth(api_key="a" * 64, metadata={"key_id": "k1"})
    assert flow_of(key) == Flow("key:k1", 1.0, None)
    team = UserAPIKeyAuth(api_key="a" * 64, metadata={"key_id": "k1"}, team_id="t 9")
    assert flow_of(team).name == "team:t_9"
    tenant = UserAPIKeyAuth(
        api_key="a" * 64,
        metadata={"key_id": "k1", "weight": "3"},
        team_id="t9",
        team_metadata={"tenant": "acme", "weight": 0.5, "max_queued": 2},
    )
    assert flow_of(tenant) == Flow("tenant:acme", 3.0, 2)  # the key's weight first
    bad = UserAPIKeyAuth(
        api_key="a" * 64, metadata={"key_id": "k2", "weight": -1, "max_queued": "x"}
    )
    assert flow_of(bad) == Flow("key:k2", 1.0, None)
