"""Pure parts of the triage_triton provider: error classification, params, template, tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest

from plugins.triton_provider.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    chat_template,
    load_template_source,
    normalize_messages,
)
from plugins.triton_provider.deployments import openai_frontend_deployment, triton_deployment
from plugins.triton_provider.dialects import (
    DIALECTS,
    INFLIGHT_BATCHER_LLM,
    LLMAPI,
    TextReader,
    dialect,
    output_text,
    sendable_inputs,
)
from plugins.triton_provider.errors import (
    ErrorKind,
    classify_upstream_error,
    to_litellm_exception,
)
from plugins.triton_provider.handler import (
    TritonGenerateHandler,
    error_text,
    parse_sse_line,
)
from plugins.triton_provider.params import (
    build_payload,
    inflight_batcher_payload,
    llmapi_payload,
)
from plugins.triton_provider.settings import (
    TritonProviderSettings,
    deployment_overrides,
    effective_settings,
)
from plugins.triton_provider.stop import StopTrimmer, trim_at_stop
from plugins.triton_provider.tokens import UsageCounter, count_tokens

# ---- classify_upstream_error ----------------------------------------------------------------

QUEUE_FULL = "[request id: <id_unknown>] Exceeds maximum queue size"
QUEUE_TIMEOUT = "[request id: 7] Request timeout expired"
ENGINE_FULL = "Maximum queue size of 8 has been reached, please try again later"
# the stock forms: TensorRT-LLM's executor error (INTERNAL, 500) with its source location and a
# backtrace, through the ensemble; Triton core's own overflow (UNAVAILABLE, 503) through it too
ENGINE_FULL_STOCK = (
    "in ensemble 'ensemble', Maximum queue size of 8 has been reached, please try again later "
    "(/src/tensorrt_llm/cpp/tensorrt_llm/executor/executorImpl.cpp:1234)\n"
    "1       0x7f3a2c0d1e2f tensorrt_llm::common::throwRuntimeError(char const*, int, "
    "std::string const&) + 100\n2       0x7f3a2c0d2000 /opt/tritonserver/backends/tensorrtllm/"
    "libtriton_tensorrtllm.so(+0x5000)"
)
QUEUE_FULL_ENSEMBLE = (
    "in ensemble 'ensemble', [request id: <id_unknown>] Exceeds maximum queue size"
)

CLASSIFY_CASES = [
    # (status, message, kind, retryable)
    (503, QUEUE_FULL, ErrorKind.TRITON_QUEUE_FULL, True),
    (400, QUEUE_FULL, ErrorKind.TRITON_QUEUE_FULL, True),
    (503, QUEUE_TIMEOUT, ErrorKind.TRITON_QUEUE_TIMEOUT, True),  # /infer
    (400, QUEUE_TIMEOUT, ErrorKind.TRITON_QUEUE_TIMEOUT, True),  # /generate, /generate_stream
    (400, ENGINE_FULL, ErrorKind.ENGINE_QUEUE_FULL, True),  # a Python model raising no code
    (500, ENGINE_FULL, ErrorKind.ENGINE_QUEUE_FULL, True),  # INTERNAL (Triton >= 2.42)
    (500, ENGINE_FULL_STOCK, ErrorKind.ENGINE_QUEUE_FULL, True),  # stock ensemble on /generate
    (200, ENGINE_FULL_STOCK, ErrorKind.ENGINE_QUEUE_FULL, True),  # ... mid-stream
    (503, QUEUE_FULL_ENSEMBLE, ErrorKind.TRITON_QUEUE_FULL, True),
    (200, ENGINE_FULL, ErrorKind.ENGINE_QUEUE_FULL, True),  # SSE error event mid-stream
    (404, "Request for unknown model: 'nope' is not found", ErrorKind.MODEL_NOT_FOUND, False),
    (400, "Request for unknown model: 'x' is not found", ErrorKind.MODEL_NOT_FOUND, False),
    (404, "Not Found", ErrorKind.MODEL_NOT_FOUND, False),
    (
        400,
        "Request for unknown model: 'llm' has no available versions",
        ErrorKind.MODEL_UNAVAILABLE,
        True,
    ),
    (400, "model is unloading", ErrorKind.MODEL_UNAVAILABLE, True),
    (503, "something odd", ErrorKind.MODEL_UNAVAILABLE, True),
    (502, "Bad Gateway", ErrorKind.MODEL_UNAVAILABLE, True),
    (None, "ConnectError: [Errno 111] Connection refused", ErrorKind.CONNECTION, True),
    (None, "ConnectTimeout: timed out", ErrorKind.CONNECTION, True),
    (None, "RemoteProtocolError: Server disconnected", ErrorKind.CONNECTION, True),
    (None, "ReadTimeout", ErrorKind.TIMEOUT, True),
    (429, "slow down", ErrorKind.RATE_LIMITED, True),
    (400, "max_tokens must be >= 1, got 0", ErrorKind.BAD_REQUEST, False),
    (
        400,
        "expected number of inputs between 2 and 17 but got 1 inputs",
        ErrorKind.BAD_REQUEST,
        False,
    ),
    (500, "CUDA error: an illegal memory access", ErrorKind.UPSTREAM, True),
    (200, "generate expects model to produce exactly 1 response", ErrorKind.UPSTREAM, False),
]


@pytest.mark.parametrize(("status", "message", "kind", "retryable"), CLASSIFY_CASES)
def test_classify_upstream_error(
    status: int | None, message: str, kind: ErrorKind, retryable: bool
) -> None:
    error = classify_upstream_error(status, message)
    assert (error.kind, error.retryable) == (kind, retryable)
    assert error.status_code == status
    assert error.message == message


EXCEPTION_CASES = [
    (503, QUEUE_FULL, litellm.ServiceUnavailableError, 503),
    (400, QUEUE_TIMEOUT, litellm.ServiceUnavailableError, 503),
    (400, ENGINE_FULL, litellm.ServiceUnavailableError, 503),
    (500, ENGINE_FULL_STOCK, litellm.ServiceUnavailableError, 503),
    (503, QUEUE_FULL_ENSEMBLE, litellm.ServiceUnavailableError, 503),
    (400, "model is unloading", litellm.ServiceUnavailableError, 503),
    (None, "ConnectError: refused", litellm.ServiceUnavailableError, 503),
    (None, "ReadTimeout", litellm.Timeout, 408),
    (404, "Request for unknown model: 'nope' is not found", litellm.NotFoundError, 404),
    (429, "slow down", litellm.RateLimitError, 429),
    (400, "max_tokens must be >= 1, got 0", litellm.BadRequestError, 400),
    (500, "boom", litellm.InternalServerError, 500),
]


@pytest.mark.parametrize(("status", "message", "exc_type", "code"), EXCEPTION_CASES)
def test_exception_mapping_keeps_upstream_text_and_api_base(
    status: int | None, message: str, exc_type: type[Exception], code: int
) -> None:
    exc = to_litellm_exception(
        classify_upstream_error(status, message), model="standin", api_base="http://a:8000"
    )
    assert isinstance(exc, exc_type)
    assert exc.status_code == code  # type: ignore[attr-defined]
    assert message in str(exc)
    assert "http://a:8000" in str(exc)
    assert exc.llm_provider == "triage_triton"  # type: ignore[attr-defined]


def test_overload_kinds() -> None:
    assert classify_upstream_error(400, ENGINE_FULL).is_overload
    assert classify_upstream_error(503, QUEUE_FULL).is_overload
    assert not classify_upstream_error(None, "refused").is_overload


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"error":"Exceeds maximum queue size"}', "Exceeds maximum queue size"),
        ('data: {"error":"Request timeout expired"}\n\n', "Request timeout expired"),
        ("upstream connect error", "upstream connect error"),
        ("", "HTTP 502 with an empty body"),
    ],
)
def test_error_text_from_json_sse_or_plain_bodies(body: str, expected: str) -> None:
    assert error_text(502, body) == expected


def test_parse_sse_line() -> None:
    assert parse_sse_line('data: {"text_output": "a"}') == {"text_output": "a"}
    assert parse_sse_line("") is None
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None
    with pytest.raises(ValueError):
        parse_sse_line("data: [1, 2]")


# ---- params ---------------------------------------------------------------------------------


def payload(params: dict[str, Any], dialect_name: str = "inflight_batcher_llm", **kw: Any) -> Any:
    kw.setdefault("stream", False)
    kw.setdefault("default_max_tokens", 64)
    return build_payload(dialect_name, "standin", "PROMPT", params, **kw)


# (OpenAI params, inflight_batcher_llm inputs, llmapi inputs); None: a 400 in that dialect.
# Besides the expected inputs each payload has text_input, the stream flag and max_tokens (64).
PARAM_CASES = [
    ({}, {}, {}),
    ({"max_tokens": 7}, {"max_tokens": 7}, {"sampling_param_max_tokens": 7}),
    ({"max_completion_tokens": 9}, {"max_tokens": 9}, {"sampling_param_max_tokens": 9}),
    (
        {"max_tokens": 7, "max_completion_tokens": 9},
        {"max_tokens": 9},
        {"sampling_param_max_tokens": 9},
    ),
    (
        {"temperature": 0.5, "top_p": 0.9},
        {"temperature": 0.5, "top_p": 0.9},
        {"sampling_param_temperature": 0.5, "sampling_param_top_p": 0.9},
    ),
    ({"stop": "END"}, {"stop_words": ["END"]}, {"sampling_param_stop": ["END"]}),
    ({"stop": ["a", "b"]}, {"stop_words": ["a", "b"]}, {"sampling_param_stop": ["a", "b"]}),
    ({"stop": []}, {}, {}),
    ({"seed": 42}, {"seed": 42}, {"sampling_param_seed": 42}),
    ({"seed": 2**64 - 1}, {"seed": 2**64 - 1}, {"sampling_param_seed": 2**64 - 1}),
    (
        {"presence_penalty": 0.1, "frequency_penalty": -0.2},
        {"presence_penalty": 0.1, "frequency_penalty": -0.2},
        {"sampling_param_presence_penalty": 0.1, "sampling_param_frequency_penalty": -0.2},
    ),
    ({"top_k": 5}, {"top_k": 5}, {"sampling_param_top_k": 5}),
    ({"min_tokens": 3}, {"min_tokens": 3}, None),  # the LLM-API model has no min_tokens input
    ({"repetition_penalty": 1.1}, {"repetition_penalty": 1.1}, None),
    ({"n": 1, "logprobs": False, "tools": []}, {}, {}),  # harmless defaults
    ({"stream_options": {"include_usage": True}, "max_retries": 0, "user": "u"}, {}, {}),
]
DIALECT_FIXED = {
    "inflight_batcher_llm": ("text_input", "stream", "max_tokens"),
    "llmapi": ("text_input", "streaming", "sampling_param_max_tokens"),
}


@pytest.mark.parametrize("dialect_name", DIALECTS)
@pytest.mark.parametrize(("params", "ensemble", "llmapi"), PARAM_CASES)
def test_params_mapping(
    dialect_name: str,
    params: dict[str, Any],
    ensemble: dict[str, Any],
    llmapi: dict[str, Any] | None,
) -> None:
    expected = ensemble if dialect_name == "inflight_batcher_llm" else llmapi
    if expected is None:
        with pytest.raises(litellm.BadRequestError) as info:
            payload(params, dialect_name)
        assert next(iter(params)) in str(info.value) and dialect_name in str(info.value)
        return
    body = payload(params, dialect_name)
    text, stream, max_tokens = DIALECT_FIXED[dialect_name]
    assert (body[text], body[stream], body[max_tokens]) == (
        "PROMPT",
        False,
        expected.get(max_tokens, 64),
    )
    extra = {k: v for k, v in body.items() if k not in (text, stream, max_tokens)}
    assert extra == {k: v for k, v in expected.items() if k != max_tokens}


def test_one_function_per_dialect() -> None:
    params = {"seed": 1, "stop": "x", "max_tokens": 3}
    assert inflight_batcher_payload("m", "P", params, stream=True, default_max_tokens=9) == {
        "text_input": "P",
        "max_tokens": 3,
        "stream": True,
        "seed": 1,
        "stop_words": ["x"],
    }
    assert llmapi_payload("m", "P", params, stream=True, default_max_tokens=9) == {
        "text_input": "P",
        "sampling_param_max_tokens": 3,
        "streaming": True,
        "sampling_param_seed": 1,
        "sampling_param_stop": ["x"],
    }
    with pytest.raises(ValueError, match="unknown Triton dialect 'vllm'"):
        build_payload("vllm", "m", "P", {}, stream=False, default_max_tokens=1)


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_stream_flag_and_fixed_inputs(dialect_name: str) -> None:
    d = dialect(dialect_name)
    body = payload(
        {"temperature": 1.0},
        dialect_name,
        stream=True,
        exclude_input_in_output=True,
        extra_inputs={"end_id": 2, d.sampling["temperature"]: 0.0},
    )
    assert body[d.stream] is True
    assert body[d.exclude_input] is True
    assert body["end_id"] == 2
    assert body[d.sampling["temperature"]] == 1.0  # the request wins over fixed inputs


def test_token_counts_are_asked_for_in_the_ensemble_only() -> None:
    body = payload({}, token_counts=True)
    assert body["return_num_input_tokens"] is True and body["return_num_output_tokens"] is True
    assert "return_num_input_tokens" not in payload({})
    with pytest.raises(ValueError, match="token-count"):
        payload({}, "llmapi", token_counts=True)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
    ],
)
def test_unsupported_params_are_a_400_naming_them(params: dict[str, Any], named: str) -> None:
    with pytest.raises(litellm.BadRequestError) as info:
        payload(params)
    assert info.value.status_code == 400
    assert named in str(info.value)
    assert "drop_params" in str(info.value)


def test_drop_params_drops_unsupported_and_keeps_the_rest() -> None:
    body = payload({"n": 3, "logprobs": True, "temperature": 0.2}, drop_params=True)
    assert body["temperature"] == 0.2
    assert "n" not in body and "logprobs" not in body
    body = payload({"min_tokens": 2, "temperature": 0.2}, "llmapi", drop_params=True)
    assert body == {
        "text_input": "PROMPT",
        "sampling_param_max_tokens": 64,
        "streaming": False,
        "sampling_param_temperature": 0.2,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"max_tokens": "5"},
        {"max_completion_tokens": -1},
        {"temperature": "hot"},
        {"seed": -1},
        {"seed": 1.5},
        {"seed": 2**64},
        {"min_tokens": -1},
        {"min_tokens": 65},  # more than max_tokens (64)
        {"min_tokens": 5, "max_tokens": 4},
        {"stop": [1, 2]},
        {"top_p": True},
    ],
)
def test_bad_values_are_a_400(params: dict[str, Any]) -> None:
    with pytest.raises(litellm.BadRequestError):
        payload(params)


# ---- stop trimming ----------------------------------------------------------------------------


def test_trim_at_stop() -> None:
    assert trim_at_stop("one two the three", ["the"]) == ("one two ", True)
    assert trim_at_stop("one two", ["the"]) == ("one two", False)
    assert trim_at_stop("a b c", ["c", "b"]) == ("a ", True)  # the earliest stop wins


@pytest.mark.parametrize(
    ("deltas", "stops", "emitted", "stopped"),
    [
        (["he", "llo ", "wor", "ld"], ["world"], "hello ", True),  # stop split over events
        (["he", "llo ", "wo", "rm"], ["world"], "hello worm", False),  # a near miss is released
        (["abc", "def"], [], "abcdef", False),
        (["x STO", "P y"], ["STOP"], "x ", True),
        (["aaa"], ["aab"], "aaa", False),
    ],
)
def test_stop_trimmer(deltas: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    trimmer = StopTrimmer(stops)
    out = "".join(trimmer.feed(d) for d in deltas) + trimmer.flush()
    assert (out, trimmer.stopped) == (emitted, stopped)


# ---- chat template ---------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]


def test_default_chatml_rendering() -> None:
    prompt = chat_template(None).render(MESSAGES)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert load_template_source("chatml") == CHATML_TEMPLATE


def test_template_string_with_tokens_and_no_generation_prompt() -> None:
    template = chat_template(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        bos_token="<s>",
    )
    assert template.render(MESSAGES) == "<s>[system] Be brief.\n[user] Hi\n[assistant]"
    assert template.render(MESSAGES, add_generation_prompt=False).endswith("Hi\n")


def test_template_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert chat_template(str(path)).render(MESSAGES) == "Be brief.|Hi|"
    with pytest.raises(ChatTemplateError, match="cannot read"):
        chat_template(str(tmp_path / "missing.jinja"))


def test_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="syntax"):
        chat_template("{% for m in messages %}")
    strict = chat_template(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        strict.render(MESSAGES)
    sandboxed = chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        sandboxed.render(MESSAGES)


def test_message_normalization() -> None:
    out = normalize_messages(
        [
            {"role": "developer", "content": "rules"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert [(m["role"], m["content"]) for m in out] == [
        ("system", "rules"),
        ("user", "ab"),
        ("assistant", ""),
    ]
    with pytest.raises(ChatTemplateError, match="image_url"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ChatTemplateError, match="empty"):
        normalize_messages([])


# ---- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [("", 0), ("hello", 1), ("hello world", 2), ("Hi, there!", 4), ("<|im_start|>user", 6)],
)
def test_count_tokens(text: str, n: int) -> None:
    assert count_tokens(text) == n


def test_usage_counts_text_by_default() -> None:
    counter = UsageCounter("a b c")
    counter.add({"text_output": "x"}, "x")
    counter.add({"text_output": " y"}, " y")
    usage = counter.usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 2, 5)


@pytest.mark.parametrize(
    ("events", "prompt", "completion"),
    [
        ([{"num_input_tokens": 11, "num_output_tokens": 4}], 11, 4),
        ([{"num_input_tokens": [11], "num_output_tokens": [4]}], 11, 4),
        # per response (TensorRT-LLM counts each response's output_ids): a stream's are summed
        ([{"num_output_tokens": 1}, {"num_output_tokens": 1}, {"num_output_tokens": 1}], 3, 3),
        ([{"num_output_tokens": 2}, {"num_output_tokens": 3}, {"num_output_tokens": 1}], 3, 6),
        ([{"num_input_tokens": 7, "num_output_tokens": 1}] * 4, 7, 4),
        ([{"num_output_tokens": 2}, {}], 3, 2),  # not on every event: count the text
    ],
)
def test_usage_prefers_upstream_counts(
    events: list[dict[str, Any]], prompt: int, completion: int
) -> None:
    counter = UsageCounter("a b c")
    for event in events:
        counter.add(event, "w ")
    usage = counter.usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)


def test_usage_ignores_upstream_counts_when_told() -> None:
    counter = UsageCounter("a b c", use_upstream=False)
    counter.add({"num_input_tokens": 99, "num_output_tokens": 99}, "one two")
    assert counter.usage().as_dict() == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }


def test_usage_reports_the_prompt_tokens_found_in_the_kv_cache() -> None:
    """``kv_cache_reused_blocks`` (asked with ``return_perf_metrics``) x the engine's block
    size, at most the prompt less one token (the last one is always computed), as
    ``usage.prompt_tokens_details.cached_tokens`` (what trtllm-serve reports)."""
    prompt = " ".join(["w"] * 150)
    counter = UsageCounter(
        prompt, reused_blocks_field="kv_cache_reused_blocks", tokens_per_block=64
    )
    counter.add({"kv_cache_reused_blocks": [2]}, "x")
    counter.add({"kv_cache_reused_blocks": [2]}, " y")
    assert counter.usage().cached_tokens == 128
    assert counter.usage().as_dict()["prompt_tokens_details"] == {"cached_tokens": 128}
    whole = UsageCounter(
        "a b c d", reused_blocks_field="kv_cache_reused_blocks", tokens_per_block=4
    )
    whole.add({"kv_cache_reused_blocks": 1}, "x")
    assert whole.usage().cached_tokens == 3
    # not asked, or not answered: no field (not a 0 that claims a miss)
    silent = UsageCounter(prompt, reused_blocks_field="kv_cache_reused_blocks")
    silent.add({}, "x")
    assert "prompt_tokens_details" not in silent.usage().as_dict()
    assert "prompt_tokens_details" not in UsageCounter(prompt).usage().as_dict()


# ---- dialects: upstream facts and responses ---------------------------------------------------

UPSTREAM = json.loads(
    (Path(__file__).parent / "fixtures" / "upstream" / "provider_dialects.json").read_text()
)
# the Python value type of each upstream TYPE_*, as sent in a generate JSON body
KIND_OF_TYPE = {
    ("TYPE_STRING", False): "str",
    ("TYPE_STRING", True): "str_list",
    ("TYPE_INT32", False): "int",
    ("TYPE_UINT64", False): "uint",
    ("TYPE_FP32", False): "float",
    ("TYPE_BOOL", False): "bool",
}


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_every_input_the_provider_sends_is_declared_upstream(dialect_name: str) -> None:
    facts = UPSTREAM["dialects"][dialect_name]
    assert all(len(src["commit"]) == 40 for src in facts["sources"]), facts["sources"]
    declared = facts["inputs"]
    for name, kind in sendable_inputs(dialect(dialect_name)).items():
        assert name in declared, f"{dialect_name}: {name} is not an upstream input"
        spec = declared[name]
        # text_input is dims [-1] on the LLM-API model but one string there too
        is_list = spec["dims"] == [-1] and name != "text_input"
        assert KIND_OF_TYPE[(spec["type"], is_list)] == kind, (name, spec)
    required = {name for name, spec in declared.items() if not spec["optional"]}
    sent_always = {dialect(dialect_name).text_input, dialect(dialect_name).max_tokens}
    assert required <= sent_always


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_every_payload_uses_declared_names_only(dialect_name: str) -> None:
    declared = UPSTREAM["dialects"][dialect_name]["inputs"]
    d = dialect(dialect_name)
    params: dict[str, Any] = {
        "max_tokens": 9,
        "stop": ["x"],
        "seed": 3,
        "min_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 4,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "repetition_penalty": 1.1,
    }
    body = payload(
        params,
        dialect_name,
        drop_params=True,
        exclude_input_in_output=True,
        token_counts=bool(d.token_count_inputs),
    )
    assert set(body) <= set(declared), set(body) - set(declared)
    assert "random_seed" not in body and "min_length" not in body


def test_private_stand_in_names_are_gone_from_the_provider() -> None:
    root = Path(__file__).parent.parent / "plugins" / "triton_provider"
    for path in root.rglob("*"):
        if path.suffix in (".py", ".md"):
            text = path.read_text()
            assert "random_seed" not in text and "min_length" not in text, path


def test_token_count_outputs_exist_in_the_ensemble_only() -> None:
    assert {"num_input_tokens", "num_output_tokens"} <= set(
        UPSTREAM["dialects"]["inflight_batcher_llm"]["outputs"]
    )
    assert "num_output_tokens" not in UPSTREAM["dialects"]["llmapi"]["outputs"]


@pytest.mark.parametrize(
    ("dialect_name", "outputs", "deltas"),
    [
        # the ensemble streams the text of each step
        ("inflight_batcher_llm", ["Hel", "lo", " world"], ["Hel", "lo", " world"]),
        ("inflight_batcher_llm", [["a", "b"], "c"], ["ab", "c"]),
        # the LLM-API model streams the whole text so far
        ("llmapi", ["Hel", "Hello", "Hello world"], ["Hel", "lo", " world"]),
        ("llmapi", [["Hel"], ["Hello"], ["Hello"]], ["Hel", "lo", ""]),
        ("llmapi", ["ab", "aX", "aXc"], ["ab", "", "c"]),  # a revised character is not re-sent
    ],
)
def test_text_reader_turns_responses_into_deltas(
    dialect_name: str, outputs: list[Any], deltas: list[str]
) -> None:
    reader = TextReader(dialect(dialect_name))
    assert [reader.delta({"text_output": out}) for out in outputs] == deltas


def test_output_text_plain_value_or_list() -> None:
    assert output_text({"text_output": "x"}) == "x"  # /generate: one element, a plain value
    assert output_text({"text_output": ["x", "y"]}) == "xy"
    assert output_text({}) == ""


def test_dialect_names() -> None:
    assert dialect("inflight_batcher_llm") is INFLIGHT_BATCHER_LLM
    assert dialect("llmapi") is LLMAPI
    with pytest.raises(ValueError, match="inflight_batcher_llm, llmapi"):
        dialect("ensemble ")


# ---- settings and request preparation --------------------------------------------------------


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_TRITON_DEFAULT_MAX_TOKENS", "33")
    monkeypatch.setenv("TRIAGE_TRITON_EXTRA_INPUTS", '{"end_id": 2}')
    settings = TritonProviderSettings()
    assert settings.default_max_tokens == 33
    assert settings.extra_inputs == {"end_id": 2}
    monkeypatch.setenv("TRIAGE_TRITON_DEFAULT_MAX_TOKENS", "0")
    with pytest.raises(ValueError):
        TritonProviderSettings()


def test_deployment_overrides() -> None:
    base = TritonProviderSettings(default_max_tokens=10)
    info = {"id": "a", "triage_triton": {"default_max_tokens": 20, "chat_template": "chatml"}}
    merged = effective_settings(base, deployment_overrides(info))
    assert (merged.default_max_tokens, merged.chat_template) == (20, "chatml")
    assert effective_settings(base, deployment_overrides({"id": "a"})) is base
    with pytest.raises(ValueError, match="process-wide"):
        deployment_overrides({"triage_triton": {"max_connections": 5}})
    with pytest.raises(ValueError, match="invalid"):
        effective_settings(base, {"default_max_tokens": 0})
    with pytest.raises(ValueError, match="invalid"):
        effective_settings(base, {"no_such_setting": 1})
    assert effective_settings(base, {"dialect": "llmapi"}).dialect == "llmapi"
    with pytest.raises(
        ValueError, match=r"(?s)invalid.*dialect.*'inflight_batcher_llm' or 'llmapi'"
    ):
        effective_settings(base, {"dialect": "tensorrt_llm"})
    with pytest.raises(ValueError, match="llmapi dialect has no token-count outputs"):
        effective_settings(base, {"dialect": "llmapi", "request_token_counts": True})


def test_dialect_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TritonProviderSettings().dialect == "inflight_batcher_llm"
    monkeypatch.setenv("TRIAGE_TRITON_DIALECT", "llmapi")
    assert TritonProviderSettings().dialect == "llmapi"
    monkeypatch.setenv("TRIAGE_TRITON_DIALECT", "nope")
    with pytest.raises(ValueError):
        TritonProviderSettings()


def prepare(handler: TritonGenerateHandler, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "model": "standin",
        "messages": MESSAGES,
        "api_base": "http://triton-a:8000/",
        "api_key": None,
        "optional_params": {"max_tokens": 5},
        "litellm_params": {"litellm_call_id": "c1"},
        "headers": None,
        "timeout": 600.0,
        "stream": False,
    }
    return handler.prepare(**{**args, **kw})


def test_prepare_builds_url_payload_and_timeout() -> None:
    handler = TritonGenerateHandler(TritonProviderSettings(request_timeout_s=30))
    request = prepare(handler)
    # non-streaming calls are collected from generate_stream, so that a cancel reaches Triton
    assert request.url == "http://triton-a:8000/v2/models/standin/generate_stream"
    assert request.payload["stream"] is True and request.upstream_stream
    assert request.payload["text_input"].endswith("<|im_start|>assistant\n")
    assert request.max_tokens == 5
    assert request.timeout == httpx.Timeout(30.0, connect=5.0)
    streaming = prepare(handler, stream=True, timeout=10, api_key="k")
    assert streaming.url.endswith("/v2/models/standin/generate_stream")
    assert streaming.payload["stream"] is True and streaming.upstream_stream
    assert streaming.timeout.read == 10.0
    assert streaming.headers == {"Authorization": "Bearer k"}
    plain = prepare(
        handler,
        litellm_params={"model_info": {"triage_triton": {"non_stream_endpoint": "generate"}}},
    )
    assert plain.url == "http://triton-a:8000/v2/models/standin/generate"
    assert plain.payload["stream"] is False and not plain.upstream_stream


def test_prepare_applies_per_deployment_settings_from_model_info() -> None:
    handler = TritonGenerateHandler(TritonProviderSettings())
    request = prepare(
        handler,
        optional_params={},
        litellm_params={
            "model_info": {"triage_triton": {"default_max_tokens": 3, "chat_template": "{{ 1 }}"}}
        },
    )
    assert request.max_tokens == 3
    assert request.prompt == "1"


def test_prepare_speaks_the_deployments_dialect() -> None:
    handler = TritonGenerateHandler(TritonProviderSettings())
    llmapi = prepare(
        handler,
        optional_params={"max_tokens": 4, "seed": 9, "stop": ["\n"]},
        litellm_params={"model_info": {"triage_triton": {"dialect": "llmapi"}}},
    )
    assert llmapi.dialect is LLMAPI and llmapi.max_tokens == 4
    assert llmapi.payload["streaming"] is True and "stream" not in llmapi.payload
    assert llmapi.payload["sampling_param_seed"] == 9
    assert llmapi.payload["sampling_param_stop"] == ["\n"]
    assert llmapi.stops == ["\n"]
    # the completion alone, by default, in both dialects; null: not sent
    assert llmapi.payload["sampling_param_exclude_input_from_output"] is True
    assert prepare(handler).payload["exclude_input_in_output"] is True
    unset = prepare(
        handler,
        litellm_params={"model_info": {"triage_triton": {"exclude_input_in_output": None}}},
    )
    assert "exclude_input_in_output" not in unset.payload
    ensemble = prepare(
        handler,
        optional_params={"max_tokens": 4, "seed": 9},
        litellm_params={"model_info": {"triage_triton": {"request_token_counts": True}}},
    )
    assert ensemble.dialect is INFLIGHT_BATCHER_LLM
    assert ensemble.payload["seed"] == 9 and ensemble.payload["return_num_output_tokens"] is True
    with pytest.raises(litellm.InternalServerError, match=r"(?s)misconfigured.*dialect"):
        prepare(handler, litellm_params={"model_info": {"triage_triton": {"dialect": "x"}}})


def test_prepare_errors() -> None:
    handler = TritonGenerateHandler(TritonProviderSettings())
    with pytest.raises(litellm.BadRequestError, match="api_base"):
        prepare(handler, api_base=None)
    with pytest.raises(litellm.InternalServerError, match="misconfigured"):
        prepare(handler, litellm_params={"model_info": {"triage_triton": {"max_connections": 1}}})
    with pytest.raises(litellm.BadRequestError, match="image_url"):
        prepare(handler, messages=[{"role": "user", "content": [{"type": "image_url"}]}])


def test_drop_params_from_litellm_params() -> None:
    handler = TritonGenerateHandler(TritonProviderSettings())
    request = prepare(handler, optional_params={"n": 2}, litellm_params={"drop_params": True})
    assert "n" not in request.payload


# ---- deployments --------------------------------------------------------------------------------


def test_triton_deployment() -> None:
    entry = triton_deployment(
        "llama",
        "rep-a",
        "http://10.0.0.5:8000/",
        "ensemble",
        rpm=100,
        provider_settings={"default_max_tokens": 128},
    )
    assert entry == {
        "model_name": "llama",
        "litellm_params": {
            "rpm": 100,
            "model": "triage_triton/ensemble",
            "api_base": "http://10.0.0.5:8000",
        },
        "model_info": {"id": "rep-a", "triage_triton": {"default_max_tokens": 128}},
    }
    with pytest.raises(ValueError):
        triton_deployment("llama", "rep a", "http://x:8000", "ensemble")
    with pytest.raises(ValueError):
        triton_deployment("llama", "rep-a", "x:8000", "ensemble")
    with pytest.raises(ValueError):
        triton_deployment("llama", "rep-a", "http://x:8000", "ens/emble")
    with pytest.raises(ValueError):
        triton_deployment(
            "llama", "rep-a", "http://x:8000", "ensemble", provider_settings={"bogus": 1}
        )
    with pytest.raises(ValueError, match="process-wide"):
        triton_deployment(
            "llama", "rep-a", "http://x:8000", "ensemble", provider_settings={"max_connections": 1}
        )


def test_triton_deployment_dialect() -> None:
    entry = triton_deployment("llama", "rep-a", "http://x:8000", "tensorrt_llm", dialect="llmapi")
    assert entry["model_info"] == {"id": "rep-a", "triage_triton": {"dialect": "llmapi"}}
    assert (
        "triage_triton"
        not in triton_deployment("l", "r", "http://x:8000", "ensemble")["model_info"]
    )
    same = triton_deployment(
        "l", "r", "http://x:8000", "e", dialect="llmapi", provider_settings={"dialect": "llmapi"}
    )
    assert same["model_info"]["triage_triton"] == {"dialect": "llmapi"}
    with pytest.raises(ValueError, match="unknown Triton dialect 'vllm'"):
        triton_deployment("l", "r", "http://x:8000", "e", dialect="vllm")
    with pytest.raises(ValueError, match="contradicts"):
        triton_deployment(
            "l", "r", "http://x:8000", "e", dialect="llmapi", provider_settings={"dialect": "x"}
        )
    with pytest.raises(ValueError, match="'inflight_batcher_llm' or 'llmapi'"):
        triton_deployment("l", "r", "http://x:8000", "e", provider_settings={"dialect": "x"})
    with pytest.raises(ValueError, match="token-count"):
        triton_deployment(
            "l",
            "r",
            "http://x:8000",
            "e",
            dialect="llmapi",
            provider_settings={"request_token_counts": True},
        )


def test_openai_frontend_deployment() -> None:
    entry = openai_frontend_deployment("llama", "rep-b", "http://10.0.0.6:9000", "llama-3-8b")
    assert entry == {
        "model_name": "llama",
        "litellm_params": {
            "model": "openai/llama-3-8b",
            "api_base": "http://10.0.0.6:9000/v1",
            "api_key": "not-used",
        },
        "model_info": {"id": "rep-b"},
    }
    again = openai_frontend_deployment("llama", "rep-b", "http://10.0.0.6:9000/v1/", "m")
    assert again["litellm_params"]["api_base"] == "http://10.0.0.6:9000/v1"
