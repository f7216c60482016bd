"""The front door's validation policy (``plugins/front_door/validation.py``): one row per bad
input a user has sent, the field it names and the code; pure, no proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from plugins.front_door.validation import Accepted, Endpoint, Rejected, check_request

LIMIT = 4096
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "standin", "messages": OK_MESSAGES, **fields}).encode()


def check(body: bytes, endpoint: Endpoint = Endpoint.CHAT) -> Accepted | Rejected:
    return check_request(endpoint, body, lambda model: LIMIT)


BAD = [
    ("json array", b"[1, 2]", None, "invalid_type"),
    ("empty body", b"", "model", "missing_required_parameter"),
    ("whitespace body", b"  \n", "model", "missing_required_parameter"),
    ("not json", b"{model: standin}", None, "invalid_json"),
    ("invalid utf-8", b'{"model": "standin", "x": "\xff"}', None, "invalid_encoding"),
    ("no model", json.dumps({"messages": OK_MESSAGES}).encode(), "model", "missing_required_parameter"),
    ("model null", chat(model=None), "model", "missing_required_parameter"),
    ("model number", chat(model=7), "model", "invalid_type"),
    ("model empty", chat(model=" "), "model", "invalid_type"),
    ("no messages", json.dumps({"model": "standin"}).encode(), "messages", "missing_required_parameter"),
    ("messages string", chat(messages="hi"), "messages", "invalid_type"),
    ("messages empty", chat(messages=[]), "messages", "invalid_value"),
    ("message not object", chat(messages=["hi"]), "messages[0]", "invalid_type"),
    ("no role", chat(messages=[{"content": "hi"}]), "messages[0].role", "missing_required_parameter"),
    ("role wizard", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_value"),
    ("second role bad", chat(messages=[*OK_MESSAGES, {"role": 3}]), "messages[1].role", "invalid_value"),
    ("content number", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    ("max_tokens huge", chat(max_tokens=1_000_000_000), "max_tokens", "max_tokens_too_large"),
    ("max_completion_tokens huge", chat(max_completion_tokens=LIMIT + 1), "max_completion_tokens", "max_tokens_too_large"),
    ("max_tokens zero", chat(max_tokens=0), "max_tokens", "invalid_value"),
    ("max_tokens string", chat(max_tokens="10"), "max_tokens", "invalid_type"),
    ("max_tokens float", chat(max_tokens=10.5), "max_tokens", "invalid_type"),
    ("max_tokens bool", chat(max_tokens=True), "max_tokens", "invalid_type"),
    ("stream string", chat(stream="yes"), "stream", "invalid_type"),
    ("n zero", chat(n=0), "n", "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "param", "code"), BAD, ids=[row[0] for row in BAD])
def test_bad_chat_bodies_are_rejected_naming_the_field(
    name: str, body: bytes, param: str | None, code: str
) -> None:
    result = check(body)
    assert isinstance(result, Rejected), result
    assert (result.param, result.code) == (param, code)
    assert "\n" not in result.message and "Traceback" not in result.message
    if param is not None:
        assert param.split("[")[0].split(".")[0] in result.message


def test_good_chat_bodies_pass_with_what_the_front_door_needs() -> None:
    assert check(chat(max_tokens=LIMIT, stream=True)) == Accepted("standin", True, LIMIT)
    assert check(chat()) == Accepted("standin", False, None)
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens, as in the provider
    assert check(chat(max_tokens=5, max_completion_tokens=7)) == Accepted("standin", False, 7)
    for role in ("system", "developer", "user", "assistant", "tool", "function"):
        assert isinstance(check(chat(messages=[{"role": role, "content": None}])), Accepted)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert isinstance(check(chat(messages=parts)), Accepted)


def test_the_limit_is_the_models_own() -> None:
    limits = {"small": 10, "big": 100}
    body = json.dumps({"model": "small", "messages": OK_MESSAGES, "max_tokens": 50}).encode()
    small = check_request(Endpoint.CHAT, body, limits.__getitem__)
    assert isinstance(small, Rejected) and "at most 10 " in small.message
    big = body.replace(b'"small"', b'"big"')
    assert isinstance(check_request(Endpoint.CHAT, big, limits.__getitem__), Accepted)


def test_completions_need_a_prompt() -> None:
    ok = json.dumps({"model": "standin", "prompt": "hi", "max_tokens": 3}).encode()
    assert check(ok, Endpoint.COMPLETIONS) == Accepted("standin", False, 3)
    missing = check(json.dumps({"model": "standin"}).encode(), Endpoint.COMPLETIONS)
    assert isinstance(missing, Rejected) and missing.param == "prompt"
    wrong = check(json.dumps({"model": "standin", "prompt": 5}).encode(), Endpoint.COMPLETIONS)
    assert isinstance(wrong, Rejected) and wrong.code == "invalid_type"


def test_anthropic_messages_need_max_tokens_and_anthropic_roles() -> None:
    ok = {"model": "standin", "max_tokens": 5, "messages": OK_MESSAGES}
    assert check(json.dumps(ok).encode(), Endpoint.MESSAGES) == Accepted("standin", False, 5)
    no_max = check(json.dumps({**ok, "max_tokens": None}).encode(), Endpoint.MESSAGES)
    assert isinstance(no_max, Rejected) and no_max.param == "max_tokens"
    system = {**ok, "messages": [{"role": "system", "content": "x"}]}
    bad_role = check(json.dumps(system).encode(), Endpoint.MESSAGES)
    assert isinstance(bad_role, Rejected) and bad_role.param == "messages[0].role"
    as_string = check(json.dumps({**ok, "messages": "hi"}).encode(), Endpoint.MESSAGES)
    assert isinstance(as_string, Rejected) and as_string.code == "invalid_type"
