"""Pure mapping of OpenAI chat parameters to a Triton generate payload (TensorRT-LLM ensemble).

``build_payload`` is the whole policy: what LiteLLM hands the provider in ``optional_params``
goes in, the JSON body of ``/v2/models/{model}/generate[_stream]`` comes out. A parameter the
ensemble cannot honour is a 400 naming it, unless drop_params says to drop it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import litellm

from plugins.triton_provider.settings import PROVIDER

log = logging.getLogger(__name__)

# OpenAI name -> ensemble input name
RENAMED = {
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "random_seed",
    # not OpenAI, but common extra-body params that the ensemble has inputs for
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
}
INTEGER_PARAMS = {"seed", "top_k"}
HANDLED = {"max_tokens", "max_completion_tokens", "stop", "stream", "n"}
# Transport or bookkeeping keys that LiteLLM may leave in optional_params: not sampling params.
IGNORED = {"stream_options", "max_retries", "user", "extra_headers", "metadata"}


def _bad_request(model: str, message: str) -> litellm.BadRequestError:
    return litellm.BadRequestError(message=message, model=model, llm_provider=PROVIDER)


def _is_unset(value: Any) -> bool:
    """None, False, and empty containers mean "not asked for" (e.g. ``logprobs=False``)."""
    return value is None or value is False or (isinstance(value, list | dict | str) and not value)


def _number(model: str, name: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_request(model, f"{name} must be a number, got {value!r}")
    return value


def _int(model: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad_request(model, f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def stop_words(model: str, stop: Any) -> list[str]:
    """OpenAI ``stop`` (a string or a list of strings) as the ensemble's ``stop_words`` list."""
    if _is_unset(stop):
        return []
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise _bad_request(model, f"stop must be a string or a list of strings, got {stop!r}")
    return [w for w in words if w]


def max_tokens_of(model: str, params: Mapping[str, Any], default_max_tokens: int) -> int:
    """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``; else default."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = params.get(name)
        if value is not None:
            return _int(model, name, value, 1)
    return default_max_tokens


def build_payload(
    model: str,
    prompt: str,
    params: Mapping[str, Any],
    *,
    stream: bool,
    default_max_tokens: int,
    drop_params: bool = False,
    exclude_input_in_output: bool | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The generate payload for ``prompt`` and the OpenAI ``params``.

    Raises ``litellm.BadRequestError`` (400) naming each unsupported parameter (``n`` > 1,
    ``tools``, ``logprobs``, ``response_format``, ...) unless ``drop_params``, and for values of
    the wrong type.
    """
    payload: dict[str, Any] = dict(extra_inputs or {})
    payload["text_input"] = prompt
    payload["max_tokens"] = max_tokens_of(model, params, default_max_tokens)
    payload["stream"] = stream

    unsupported: list[str] = []
    n = params.get("n")
    if n is not None and n != 1:
        unsupported.append("n")
    for name, value in params.items():
        if name in HANDLED or name in IGNORED or value is None:
            continue
        if name in RENAMED:
            if name in INTEGER_PARAMS:
                payload[RENAMED[name]] = _int(model, name, value, 0)
            else:
                payload[RENAMED[name]] = _number(model, name, value)
        elif not _is_unset(value):
            unsupported.append(name)

    words = stop_words(model, params.get("stop"))
    if words:
        payload["stop_words"] = words
    if exclude_input_in_output is not None:
        payload["exclude_input_in_output"] = exclude_input_in_output

    if unsupported:
        if not drop_params:
            names = ", ".join(sorted(unsupported))
            raise _bad_request(
                model,
                f"{PROVIDER} (Triton generate) does not support: {names}. Remove "
                f"{'it' if len(unsupported) == 1 else 'them'}, or set drop_params: true to "
                "drop unsupported parameters.",
            )
        log.info("dropping parameters %s for %s (drop_params)", sorted(unsupported), model)
    return payload
