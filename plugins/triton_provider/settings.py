"""Settings of the ``triage_triton`` provider: env ``TRIAGE_TRITON_*``, per-deployment overrides.

Process-wide values come from the environment (``TRIAGE_TRITON_DEFAULT_MAX_TOKENS=128``, ...).
A deployment may override the *per-request* fields through its ``model_info``::

    model_info:
      id: replica-a
      triage_triton: {dialect: llmapi, chat_template: /etc/triage/llama3.jinja}

``model_info`` is the place because the Router stamps the deployment's own ``model_info`` into
the call (a client cannot set it), whereas extra ``litellm_params`` keys reach the handler mixed
with the client's extra body fields in ``optional_params``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROVIDER = "triage_triton"  # the custom_provider_map name and the model prefix
MODEL_INFO_KEY = "triage_triton"  # model_info key of per-deployment overrides

# Fields that shape the shared HTTP client: process-wide only, never per deployment.
CLIENT_FIELDS = frozenset({"connect_timeout_s", "max_connections", "max_keepalive_connections"})


class TritonProviderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_TRITON_", extra="forbid", frozen=True)

    dialect: Literal["inflight_batcher_llm", "llmapi"] = Field(
        default="inflight_batcher_llm",
        description="the input/output naming of the Triton model: inflight_batcher_llm (NVIDIA's "
        "stock TensorRT-LLM ensemble: text_input, max_tokens, stream, seed, min_tokens, "
        "stop_words, ...) or llmapi (the LLM-API tensorrt_llm python model: text_input, "
        "streaming, sampling_param_*)",
    )

    chat_template: str | None = Field(
        default=None,
        description="None or 'chatml': the built-in ChatML template; a jinja2 template string "
        "(contains '{{' or '{%'); otherwise a path to a template file",
    )
    bos_token: str = Field(default="", description="exposed to the template as bos_token")
    eos_token: str = Field(default="", description="exposed to the template as eos_token")
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        description="max_tokens when the request sets neither max_tokens nor max_completion_tokens",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="read timeout per request (between stream events); "
        "LiteLLM's own timeout caps it",
    )
    trim_stop: bool = Field(
        default=True,
        description="cut the text at the first stop string, as OpenAI does",
    )
    use_upstream_token_counts: bool = Field(
        default=True,
        description="prefer num_input_tokens / num_output_tokens outputs when "
        "the model returns them (see request_token_counts)",
    )
    exclude_input_in_output: bool | None = Field(
        default=True,
        description="sent as exclude_input_in_output (inflight_batcher_llm) or "
        "sampling_param_exclude_input_from_output (llmapi): true (default) so that the answer "
        "is the completion alone, as OpenAI's is (the stock LLM-API model's own default for an "
        "absent input is false, the ensemble's depends on its tensorrt_llm config); null: not "
        "sent, for models without that input",
    )
    request_token_counts: bool = Field(
        default=False,
        description="inflight_batcher_llm only: send return_num_input_tokens / "
        "return_num_output_tokens so that the ensemble answers num_input_tokens / "
        "num_output_tokens (ensembles that declare these inputs only; older ones reject them)",
    )
    request_kv_cache_stats: bool = Field(
        default=False,
        description="send return_perf_metrics (inflight_batcher_llm) or "
        "sampling_param_return_perf_metrics (llmapi) so that the model answers the request's "
        "reused KV-cache blocks; usage.prompt_tokens_details.cached_tokens = reused blocks x "
        "kv_tokens_per_block, at most prompt_tokens - 1 (what trtllm-serve reports)",
    )
    kv_tokens_per_block: int = Field(
        default=64,
        ge=1,
        description="the engine's tokens per KV-cache block (trtllm-build --tokens_per_block; "
        "the stand-in's kv_tokens_per_block)",
    )
    extra_inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="fixed extra inputs merged into every payload, e.g. {end_id: 2, pad_id: 2}",
    )
    non_stream_endpoint: Literal["generate_stream", "generate"] = Field(
        default="generate_stream",
        description="where non-streaming calls go: generate_stream (stream: true, the events "
        "collected into one answer, so that a cancelled call cancels the request in Triton, "
        "which ignores a client that leaves /generate) or generate (models that are not "
        "decoupled, which cannot stream)",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    max_keepalive_connections: int = Field(default=200, ge=0)

    @model_validator(mode="after")
    def _dialect_supports(self) -> TritonProviderSettings:
        if self.request_token_counts and self.dialect != "inflight_batcher_llm":
            raise ValueError(
                f"request_token_counts: the {self.dialect} dialect has no token-count outputs"
            )
        return self


def deployment_overrides(model_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``triage_triton`` mapping of a deployment's ``model_info`` (empty when absent)."""
    if not model_info:
        return {}
    overrides = model_info.get(MODEL_INFO_KEY)
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"model_info.{MODEL_INFO_KEY} must be a mapping, got {overrides!r}")
    client_level = sorted(CLIENT_FIELDS & set(overrides))
    if client_level:
        raise ValueError(
            f"model_info.{MODEL_INFO_KEY}: {client_level} are process-wide "
            "(set TRIAGE_TRITON_* instead)"
        )
    return dict(overrides)


def effective_settings(
    base: TritonProviderSettings, overrides: Mapping[str, Any]
) -> TritonProviderSettings:
    """``base`` with a deployment's overrides applied and validated (cached per distinct pair)."""
    if not overrides:
        return base
    try:
        overrides_json = json.dumps(dict(overrides), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"model_info.{MODEL_INFO_KEY} must be JSON-like: {exc}") from exc
    return _merged(base.model_dump_json(), overrides_json)


@lru_cache(maxsize=256)
def _merged(base_json: str, overrides_json: str) -> TritonProviderSettings:
    values = {**json.loads(base_json), **json.loads(overrides_json)}
    try:
        return TritonProviderSettings.model_validate(values)
    except ValidationError as exc:
        raise ValueError(f"invalid model_info.{MODEL_INFO_KEY}: {exc}") from exc
