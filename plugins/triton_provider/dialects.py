"""The two request/response dialects of NVIDIA's stock Triton repositories for TensorRT-LLM.

* ``inflight_batcher_llm``: the ``ensemble`` model of ``all_models/inflight_batcher_llm``
  (preprocessing → tensorrt_llm → postprocessing). Inputs ``text_input``, ``max_tokens``,
  ``stream``, ``stop_words``, ``seed``, ``min_tokens``, ...; output ``text_output``. A stream's
  ``text_output`` is the text of that step only (a delta). Newer ensembles also take
  ``return_num_input_tokens`` / ``return_num_output_tokens`` and then answer
  ``num_input_tokens`` / ``num_output_tokens``: the output count of a streamed response is the
  number of tokens *in that response* (summed here), of a single response the whole output.
* ``llmapi``: the python ``tensorrt_llm`` model of ``all_models/llmapi`` (the LLM API, PyTorch
  backend). Inputs ``text_input``, ``streaming``, ``sampling_param_*``; output ``text_output``,
  which in a stream is the **whole text so far** (``CompletionOutput.text``), so the delta is
  what it adds to the previous event. No token-count outputs.

Which names were read from which upstream file and commit: README.md and
``tests/fixtures/upstream/provider_dialects.json``. Everything here is pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

DialectName = Literal["inflight_batcher_llm", "llmapi"]
DIALECTS: tuple[DialectName, ...] = ("inflight_batcher_llm", "llmapi")
DEFAULT_DIALECT: DialectName = "inflight_batcher_llm"

# Python type of each value the provider sends (checked against the upstream TYPE_* in tests)
InputKind = Literal["str", "str_list", "int", "uint", "float", "bool"]


@dataclass(frozen=True)
class Dialect:
    name: DialectName
    text_input: str
    max_tokens: str
    stream: str
    stop: str
    exclude_input: str
    sampling: Mapping[str, str]
    """OpenAI (or common extra-body) parameter -> this dialect's input name."""
    token_count_inputs: tuple[str, ...]
    """Boolean inputs that ask for ``num_input_tokens`` / ``num_output_tokens`` (may be empty)."""
    cumulative_stream_text: bool
    """A stream's ``text_output`` is the whole text so far (else: the text of that event)."""
    perf_metrics_input: str
    """The boolean input that asks for per-request perf metrics, the KV-cache stats among them."""
    reused_blocks_output: str
    """The output that then counts the request's prompt blocks found in the KV cache."""
    kinds: Mapping[str, InputKind]
    """Every input name this provider can send in this dialect, with its value's type."""


INFLIGHT_BATCHER_LLM = Dialect(
    name="inflight_batcher_llm",
    text_input="text_input",
    max_tokens="max_tokens",
    stream="stream",
    stop="stop_words",
    exclude_input="exclude_input_in_output",
    sampling={
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "seed": "seed",
        "min_tokens": "min_tokens",
        "presence_penalty": "presence_penalty",
        "frequency_penalty": "frequency_penalty",
        "repetition_penalty": "repetition_penalty",
    },
    token_count_inputs=("return_num_input_tokens", "return_num_output_tokens"),
    cumulative_stream_text=False,
    perf_metrics_input="return_perf_metrics",
    reused_blocks_output="kv_cache_reused_blocks",
    kinds={
        "text_input": "str",
        "max_tokens": "int",
        "stream": "bool",
        "stop_words": "str_list",
        "exclude_input_in_output": "bool",
        "temperature": "float",
        "top_p": "float",
        "top_k": "int",
        "seed": "uint",
        "min_tokens": "int",
        "presence_penalty": "float",
        "frequency_penalty": "float",
        "repetition_penalty": "float",
        "return_num_input_tokens": "bool",
        "return_num_output_tokens": "bool",
        "return_perf_metrics": "bool",
    },
)

LLMAPI = Dialect(
    name="llmapi",
    text_input="text_input",
    max_tokens="sampling_param_max_tokens",
    stream="streaming",
    stop="sampling_param_stop",
    exclude_input="sampling_param_exclude_input_from_output",
    sampling={
        "temperature": "sampling_param_temperature",
        "top_p": "sampling_param_top_p",
        "top_k": "sampling_param_top_k",
        "seed": "sampling_param_seed",
        "presence_penalty": "sampling_param_presence_penalty",
        "frequency_penalty": "sampling_param_frequency_penalty",
    },
    token_count_inputs=(),
    cumulative_stream_text=True,
    perf_metrics_input="sampling_param_return_perf_metrics",
    reused_blocks_output="kv_cache_reused_block",
    kinds={
        "text_input": "str",
        "sampling_param_max_tokens": "int",
        "streaming": "bool",
        "sampling_param_stop": "str_list",
        "sampling_param_exclude_input_from_output": "bool",
        "sampling_param_temperature": "float",
        "sampling_param_top_p": "float",
        "sampling_param_top_k": "int",
        "sampling_param_seed": "uint",
        "sampling_param_presence_penalty": "float",
        "sampling_param_frequency_penalty": "float",
        "sampling_param_return_perf_metrics": "bool",
    },
)

_BY_NAME: dict[str, Dialect] = {d.name: d for d in (INFLIGHT_BATCHER_LLM, LLMAPI)}

# OpenAI parameters whose value is an integer (the rest of ``sampling`` are numbers)
INTEGER_PARAMS = {"seed": 0, "top_k": 0, "min_tokens": 0}  # name -> minimum


def dialect(name: str) -> Dialect:
    """The dialect called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown Triton dialect {name!r}: expected one of {', '.join(DIALECTS)}"
        ) from None


def sendable_inputs(d: Dialect) -> dict[str, InputKind]:
    """Every input name the provider may put in a payload of dialect ``d`` (``extra_inputs``
    aside), with the type of its value."""
    names = {
        d.text_input,
        d.max_tokens,
        d.stream,
        d.stop,
        d.exclude_input,
        *d.sampling.values(),
        *d.token_count_inputs,
        d.perf_metrics_input,
    }
    missing = names - set(d.kinds)
    if missing:  # a table edit that forgot a kind: fail loudly in tests
        raise AssertionError(f"{d.name}: no kind for {sorted(missing)}")
    return {name: d.kinds[name] for name in sorted(names)}


# ---- responses ---------------------------------------------------------------------------------


def output_text(event: Mapping[str, Any]) -> str:
    """``text_output`` of one response: a plain value (``/generate``'s one-element output) or a
    list (joined)."""
    value = event.get("text_output", "")
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return str(value)


class TextReader:
    """Turns the ``text_output`` of successive responses into text deltas, per dialect."""

    def __init__(self, d: Dialect) -> None:
        self._cumulative = d.cumulative_stream_text
        self._seen = ""

    def delta(self, event: Mapping[str, Any]) -> str:
        text = output_text(event)
        if not self._cumulative:
            return text
        # the whole text so far: what is new is what follows the text already seen
        if text.startswith(self._seen):
            new = text[len(self._seen) :]
        else:  # the detokenizer revised earlier characters: emit only what lies beyond them
            new = text[len(self._seen) :] if len(text) > len(self._seen) else ""
        if len(text) >= len(self._seen):
            self._seen = text
        return new
