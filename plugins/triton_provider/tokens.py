"""Usage counting for responses of Triton's generate endpoints.

Triton's generate extension returns text only, so usage is counted here: by default with the
CPU stand-in's rule (words and punctuation marks, ``count_tokens``), which is exact for the
stand-in and a rough estimate for a real model. When the model returns ``num_input_tokens`` /
``num_output_tokens`` outputs (newer ``inflight_batcher_llm`` ensembles do when asked with
``return_num_input_tokens`` / ``return_num_output_tokens``), those win. The output count of a
response is the number of tokens *in that response* (TensorRT-LLM's backend counts the response's
``output_ids``): per step in a stream, so the counts of a stream's events are summed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]")

INPUT_COUNT_FIELD = "num_input_tokens"
OUTPUT_COUNT_FIELD = "num_output_tokens"


def count_tokens(text: str) -> int:
    """The stand-in's tokenizer: one token per word and per punctuation mark."""
    return len(TOKEN_RE.findall(text))


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    """Prompt tokens the engine found in its KV cache (None: the model did not say)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens is not None:  # OpenAI's field, as trtllm-serve fills it
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


def upstream_count(event: Mapping[str, Any], field: str) -> int | None:
    """An integer count output of a Triton response (``5`` or ``[5]``), or None."""
    value = event.get(field)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value < 0 or value != int(value):
        return None
    return int(value)


class UsageCounter:
    """Accumulates usage over the events of one response (one event when not streaming).

    Output counts are per response (summed over a stream's events); they are used only when
    every event carries one, else the text is counted.
    """

    def __init__(
        self,
        prompt: str,
        use_upstream: bool = True,
        reused_blocks_field: str | None = None,
        tokens_per_block: int = 64,
    ) -> None:
        self._prompt = prompt
        self._use_upstream = use_upstream
        self._reused_field = reused_blocks_field
        self._tokens_per_block = tokens_per_block
        self._reused: int | None = None
        self._texts: list[str] = []
        self._input: int | None = None
        self._outputs: list[int] = []
        self._events = 0

    def add(self, event: Mapping[str, Any], text: str) -> None:
        self._events += 1
        self._texts.append(text)
        if self._reused_field is not None:
            reused = upstream_count(event, self._reused_field)
            if reused is not None:
                self._reused = max(reused, self._reused or 0)
        if not self._use_upstream:
            return
        n_in = upstream_count(event, INPUT_COUNT_FIELD)
        if n_in is not None:
            self._input = n_in
        n_out = upstream_count(event, OUTPUT_COUNT_FIELD)
        if n_out is not None:
            self._outputs.append(n_out)

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def usage(self) -> TokenUsage:
        prompt = self._input if self._input is not None else count_tokens(self._prompt)
        if self._outputs and len(self._outputs) == self._events:
            completion = sum(self._outputs)
        else:
            completion = count_tokens(self.text)
        cached = None
        if self._reused is not None:
            cached = max(0, min(self._reused * self._tokens_per_block, prompt - 1))
        return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
