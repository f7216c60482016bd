"""The request-validation policy of the front door: one pure function from a request body to
either the facts the front door needs (model, stream) or the 400 that names the bad field.

It checks what LiteLLM would otherwise take on trust or answer badly (a 500 in ``text/plain``
for a JSON array, a 404 "model None" for a missing model, a traceback for ``messages`` given as a
string, a 200 for a message without a role), and bounds ``max_tokens`` by the model's limit:
a request may not hold a replica's batch slot for longer than the model allows. Fields it does
not name are LiteLLM's and the provider's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""Roles of OpenAI's chat completions API (``developer`` replaces ``system`` for o-series
models; ``function`` is the deprecated tool role)."""
MAX_CHOICES = 128
"""OpenAI's own bound on ``n``."""


ANTHROPIC_ROLES = frozenset({"user", "assistant"})
"""Roles of Anthropic's messages API (the system prompt is the top-level ``system``)."""


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    MESSAGES = "messages"
    """Anthropic's ``/v1/messages`` (LiteLLM serves it for every model)."""


@dataclass(frozen=True)
class Accepted:
    model: str
    stream: bool
    max_tokens: int | None
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed body (for the checks that need the proxy's configuration)."""


@dataclass(frozen=True)
class Rejected:
    """A 400: OpenAI's ``invalid_request_error`` with the field in ``param``."""

    message: str
    param: str | None
    code: str


def check_request(endpoint: Endpoint, body: bytes, max_tokens_limit: Any) -> Accepted | Rejected:
    """Validate ``body`` for ``endpoint``; ``max_tokens_limit(model) -> int`` is the model's
    largest allowed ``max_tokens`` / ``max_completion_tokens``."""
    if not body.strip():
        return Rejected(
            "the request body is empty: send a JSON object with 'model' and "
            + ("'prompt'" if endpoint is Endpoint.COMPLETIONS else "'messages'"),
            "model",
            "missing_required_parameter",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(
            f"the request body is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejected(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}",
            None,
            "invalid_json",
        )
    if not isinstance(data, dict):
        return Rejected(
            f"the request body must be a JSON object, not {_json_type(data)}",
            None,
            "invalid_type",
        )
    model = data.get("model")
    if model is None:
        return Rejected("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        return Rejected(
            f"'model' must be a non-empty string, not {_json_type(model)}", "model", "invalid_type"
        )
    if endpoint is Endpoint.CHAT:
        problem = _check_messages(data, CHAT_ROLES)
    elif endpoint is Endpoint.MESSAGES:
        problem = _check_messages(data, ANTHROPIC_ROLES) or _required_max_tokens(data)
    else:
        problem = _check_prompt(data)
    problem = problem or _check_common(data)
    if problem is not None:
        return problem
    max_tokens, problem = _check_max_tokens(data, max_tokens_limit(model))
    if problem is not None:
        return problem
    return Accepted(model, data.get("stream") is True, max_tokens, data)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _required_max_tokens(data: dict[str, Any]) -> Rejected | None:
    if data.get("max_tokens") is None:
        return Rejected("'max_tokens' is required", "max_tokens", "missing_required_parameter")
    return None


def _check_messages(data: dict[str, Any], roles: frozenset[str]) -> Rejected | None:
    messages = data.get("messages")
    if messages is None:
        return Rejected("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        return Rejected(
            f"'messages' must be an array of message objects, not {_json_type(messages)}",
            "messages",
            "invalid_type",
        )
    if not messages:
        return Rejected("'messages' must not be empty", "messages", "invalid_value")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            return Rejected(
                f"'{where}' must be an object, not {_json_type(message)}", where, "invalid_type"
            )
        role = message.get("role")
        if role is None:
            return Rejected(
                f"'{where}.role' is required", f"{where}.role", "missing_required_parameter"
            )
        if role not in roles:
            return Rejected(
                f"'{where}.role' must be one of {', '.join(sorted(roles))}, not "
                f"{json.dumps(role)[:40]}",
                f"{where}.role",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            return Rejected(
                f"'{where}.content' must be a string or an array of content parts, not "
                f"{_json_type(content)}",
                f"{where}.content",
                "invalid_type",
            )
    return None


def _check_prompt(data: dict[str, Any]) -> Rejected | None:
    prompt = data.get("prompt")
    if prompt is None:
        return Rejected("'prompt' is required", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str | list):
        return Rejected(
            f"'prompt' must be a string or an array, not {_json_type(prompt)}",
            "prompt",
            "invalid_type",
        )
    return None


def _check_common(data: dict[str, Any]) -> Rejected | None:
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return Rejected(
            f"'stream' must be a boolean, not {_json_type(stream)}", "stream", "invalid_type"
        )
    n = data.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_CHOICES):
        return Rejected(f"'n' must be an integer from 1 to {MAX_CHOICES}", "n", "invalid_value")
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_max_tokens(data: dict[str, Any], limit: int) -> tuple[int | None, Rejected | None]:
    """The request's token bound (``max_completion_tokens`` wins, as in the provider)."""
    chosen: int | None = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = data.get(name)
        if value is None:
            continue
        if not _is_int(value):
            return None, Rejected(
                f"'{name}' must be an integer, not {_json_type(value)}", name, "invalid_type"
            )
        if value < 1:
            return None, Rejected(
                f"'{name}' must be at least 1, not {value}", name, "invalid_value"
            )
        if value > limit:
            return None, Rejected(
                f"'{name}' is too large: {value}. This model supports at most {limit} "
                "completion tokens.",
                name,
                "max_tokens_too_large",
            )
        chosen = value  # max_completion_tokens, read last, wins
    return chosen, None
