"""Which routes a key of the offline store may call, and which model a request names: pure.

An ordinary key (not the master key) may call the route families an OpenAI or Anthropic SDK
user needs against this gateway, and nothing else:

* ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (and without ``/v1``);
* ``/v1/responses`` (and ``/responses``, ``/openai/v1/responses``), with its
  ``/{id}``, ``/{id}/input_items`` and ``/{id}/cancel``;
* ``/v1/messages`` and ``/v1/messages/count_tokens`` (LiteLLM's Anthropic route);
* ``/v1/models``, ``/v1/models/{id}`` (and without ``/v1``);
* ``/model/info``, ``/v1/model/info``, ``/model_group/info``.

LiteLLM's own list of "LLM API routes" (``RouteChecks.is_llm_api_route``) is far wider: images,
audio, files, batches, assistants, vector stores, MCP, agents, provider pass-throughs
(``/vertex_ai/*``, ``/openai_passthrough``...) and aliases of the chat route
(``/engines/{model}/chat/completions``, ``/openai/deployments/{model}/chat/completions``,
``/cursor/chat/completions``) that skip the front door's validation and answer a malformed body
with a Python traceback. None of them is served by a Triton fleet, so keys are kept off them;
the master key still reaches every route.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum


class Family(StrEnum):
    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    MODELS = "models"
    MODEL_INFO = "model/info"


_FAMILIES: tuple[tuple[Family, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        (Family.CHAT, r"(/v1)?/chat/completions"),
        (Family.COMPLETIONS, r"(/v1)?/completions"),
        (Family.EMBEDDINGS, r"(/v1)?/embeddings"),
        (Family.RESPONSES, r"(/openai/v1|/v1)?/responses(/[^/]+(/input_items|/cancel)?)?"),
        (Family.MESSAGES, r"/v1/messages(/count_tokens)?"),
        (Family.MODELS, r"(/v1)?/models(/[^/]+)?"),
        (Family.MODEL_INFO, r"(/v1)?/model/info|/model_group/info"),
    )
)
_RETRIEVE_MODEL = re.compile(r"(?:/v1)?/models/([^/]+)")
_MODEL_IN_BODY = re.compile(
    r"(/v1)?/(chat/completions|completions|embeddings)|(/openai/v1|/v1)?/responses"
    r"|/v1/messages(/count_tokens)?"
)

KEY_ROUTES_TEXT = ", ".join(f.value for f in Family)
"""The families, for error messages."""


def route_family(route: str) -> Family | None:
    """The family of ``route`` a key may call, or None (master key only)."""
    for family, pattern in _FAMILIES:
        if pattern.fullmatch(route):
            return family
    return None


def key_route_allowed(route: str) -> bool:
    """Whether a key other than the master key may call ``route``."""
    return route_family(route) is not None


def retrieved_model(route: str) -> str | None:
    """The model id of ``GET /v1/models/{id}`` (the OpenAI SDK's ``models.retrieve``)."""
    match = _RETRIEVE_MODEL.fullmatch(route)
    return match.group(1) if match else None


def names_model_in_body(route: str, method: str) -> bool:
    """Whether ``route`` takes the model from its JSON body (the inference routes)."""
    return method.upper() == "POST" and _MODEL_IN_BODY.fullmatch(route) is not None


def body_model(body: object) -> str | None:
    """The ``model`` of a parsed JSON body when it is a non-empty string (a body that is not an
    object, or any other ``model``, is left to LiteLLM's 400)."""
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) and model else None
