"""Pure mapping of OpenAI chat parameters to a Triton generate payload, one function per dialect.

``inflight_batcher_payload`` (the stock ``ensemble``) and ``llmapi_payload`` (the LLM-API
``tensorrt_llm`` python model) are the whole policy: what LiteLLM hands the provider in
``optional_params`` goes in, the JSON body of ``/v2/models/{model}/generate[_stream]`` comes out,
with the dialect's input names (``dialects.py``). A parameter the dialect has no input for is a
400 naming it, unless drop_params says to drop it: on ``/generate[_stream]`` Triton does not
reject a name the model does not declare, it passes it on as a request parameter, which the stock
models ignore, so sending it anyway would silently drop the client's parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import litellm

from plugins.triton_provider.dialects import (
    INFLIGHT_BATCHER_LLM,
    INTEGER_PARAMS,
    LLMAPI,
    Dialect,
    dialect,
)
from plugins.triton_provider.settings import PROVIDER

log = logging.getLogger(__name__)

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


UINT64_MAX = 2**64 - 1  # seed is a TYPE_UINT64 input in both dialects


def _int(model: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad_request(model, f"{name} must be an integer >= {minimum}, got {value!r}")
    if value > UINT64_MAX:
        raise _bad_request(model, f"{name} must be at most {UINT64_MAX}, got {value!r}")
    return value


def stop_words(model: str, stop: Any) -> list[str]:
    """OpenAI ``stop`` (a string or a list of strings) as a list (``stop_words`` /
    ``sampling_param_stop``)."""
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


def _payload(
    d: Dialect,
    model: str,
    prompt: str,
    params: Mapping[str, Any],
    *,
    stream: bool,
    default_max_tokens: int,
    drop_params: bool,
    exclude_input_in_output: bool | None,
    extra_inputs: Mapping[str, Any] | None,
    token_counts: bool,
) -> dict[str, Any]:
    payload: dict[str, Any] = dict(extra_inputs or {})
    payload[d.text_input] = prompt
    max_tokens = max_tokens_of(model, params, default_max_tokens)
    payload[d.max_tokens] = max_tokens
    payload[d.stream] = stream

    unsupported: list[str] = []
    n = params.get("n")
    if n is not None and n != 1:
        unsupported.append("n")
    for name, value in params.items():
        if name in HANDLED or name in IGNORED or value is None:
            continue
        if name in d.sampling:
            if name in INTEGER_PARAMS:
                payload[d.sampling[name]] = _int(model, name, value, INTEGER_PARAMS[name])
            else:
                payload[d.sampling[name]] = _number(model, name, value)
        elif not _is_unset(value):
            unsupported.append(name)
    min_tokens = params.get("min_tokens")
    if "min_tokens" in d.sampling and min_tokens is not None and min_tokens > max_tokens:
        raise _bad_request(
            model, f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"
        )

    words = stop_words(model, params.get("stop"))
    if words:
        payload[d.stop] = words
    if exclude_input_in_output is not None:
        payload[d.exclude_input] = exclude_input_in_output
    if token_counts:
        for name in d.token_count_inputs:
            payload[name] = True

    if unsupported:
        if not drop_params:
            names = ", ".join(sorted(unsupported))
            raise _bad_request(
                model,
                f"{PROVIDER} (Triton generate, {d.name} dialect) does not support: {names}. "
                f"Remove {'it' if len(unsupported) == 1 else 'them'}, or set drop_params: true "
                "to drop unsupported parameters.",
            )
        log.info("dropping parameters %s for %s (drop_params)", sorted(unsupported), model)
    return payload


def inflight_batcher_payload(
    model: str,
    prompt: str,
    params: Mapping[str, Any],
    *,
    stream: bool,
    default_max_tokens: int,
    drop_params: bool = False,
    exclude_input_in_output: bool | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
    token_counts: bool = False,
) -> dict[str, Any]:
    """The payload for the stock ``inflight_batcher_llm`` ``ensemble``.

    ``seed`` → ``seed``, ``min_tokens`` → ``min_tokens``, ``stop`` → ``stop_words``,
    ``temperature`` / ``top_p`` / ``top_k`` / penalties by their names; ``token_counts`` asks
    for ``num_input_tokens`` / ``num_output_tokens`` (ensembles that declare the inputs only).
    Raises ``litellm.BadRequestError`` (400) naming each unsupported parameter (``n`` > 1,
    ``tools``, ``logprobs``, ``response_format``, ...) unless ``drop_params``, and for values of
    the wrong type.
    """
    return _payload(
        INFLIGHT_BATCHER_LLM,
        model,
        prompt,
        params,
        stream=stream,
        default_max_tokens=default_max_tokens,
        drop_params=drop_params,
        exclude_input_in_output=exclude_input_in_output,
        extra_inputs=extra_inputs,
        token_counts=token_counts,
    )


def llmapi_payload(
    model: str,
    prompt: str,
    params: Mapping[str, Any],
    *,
    stream: bool,
    default_max_tokens: int,
    drop_params: bool = False,
    exclude_input_in_output: bool | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
    token_counts: bool = False,
) -> dict[str, Any]:
    """The payload for the LLM-API ``tensorrt_llm`` python model: ``streaming`` and
    ``sampling_param_*`` inputs (``seed`` → ``sampling_param_seed``, ``stop`` →
    ``sampling_param_stop``, ...). It has no inputs for ``min_tokens`` or
    ``repetition_penalty`` (a 400 like any unsupported parameter) and no token counts
    (``token_counts`` is refused by the settings).
    """
    if token_counts:
        raise ValueError("the llmapi dialect has no token-count outputs")
    return _payload(
        LLMAPI,
        model,
        prompt,
        params,
        stream=stream,
        default_max_tokens=default_max_tokens,
        drop_params=drop_params,
        exclude_input_in_output=exclude_input_in_output,
        extra_inputs=extra_inputs,
        token_counts=False,
    )


PAYLOAD_BUILDERS = {
    INFLIGHT_BATCHER_LLM.name: inflight_batcher_payload,
    LLMAPI.name: llmapi_payload,
}


def build_payload(
    dialect_name: str, model: str, prompt: str, params: Mapping[str, Any], **kw: Any
) -> dict[str, Any]:
    """The payload of dialect ``dialect_name`` (see the two functions above)."""
    return PAYLOAD_BUILDERS[dialect(dialect_name).name](model, prompt, params, **kw)
