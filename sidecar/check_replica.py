"""``triage check-replica URL``: what triage will see of a running Triton server.

Point it at any Triton (a stock TensorRT-LLM repository, the LLM-API model, or the CPU
stand-in) before putting it behind the gateway. It reads Triton's repository index and each
ready model's configuration (``/v2/models/<m>/config``), detects the dialect the routed model
speaks from its input names (NVIDIA's stock ``inflight_batcher_llm`` ensemble, or the stock
``llmapi`` model), reads the metrics endpoint, and shows what the load sidecar would publish
(``parse_engine_sample`` on the same text, the ``ReplicaState`` the sidecar builds from it).

Exit status: 0 when nothing is wrong (warnings allowed), 1 naming each problem, 2 when the
server cannot be reached or the arguments are wrong. ``--json`` prints the whole report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.keyschema import ReplicaState
from sidecar.triton_metrics import (
    DEFAULT_ARRIVALS_MODEL,
    PENDING,
    TRT_GENERAL,
    TRT_KV,
    TRT_REQUESTS,
    parse_engine_sample,
)

# NVIDIA's stock input names and data types (facts from upstream; the tests hold them against
# tests/fixtures/upstream/build_stock_names.json, which names the files and commits).
ENSEMBLE_INPUTS: dict[str, str] = {
    "text_input": "TYPE_STRING",
    "decoder_text_input": "TYPE_STRING",
    "max_tokens": "TYPE_INT32",
    "num_return_sequences": "TYPE_INT32",
    "bad_words": "TYPE_STRING",
    "stop_words": "TYPE_STRING",
    "exclude_input_in_output": "TYPE_BOOL",
    "end_id": "TYPE_INT32",
    "pad_id": "TYPE_INT32",
    "top_k": "TYPE_INT32",
    "top_p": "TYPE_FP32",
    "temperature": "TYPE_FP32",
    "length_penalty": "TYPE_FP32",
    "repetition_penalty": "TYPE_FP32",
    "min_tokens": "TYPE_INT32",
    "presence_penalty": "TYPE_FP32",
    "frequency_penalty": "TYPE_FP32",
    "seed": "TYPE_UINT64",
    "return_log_probs": "TYPE_BOOL",
    "return_context_logits": "TYPE_BOOL",
    "return_generation_logits": "TYPE_BOOL",
    "return_perf_metrics": "TYPE_BOOL",
    "return_num_input_tokens": "TYPE_BOOL",
    "return_num_output_tokens": "TYPE_BOOL",
    "beam_width": "TYPE_INT32",
    "stream": "TYPE_BOOL",
    "prompt_embedding_table": "TYPE_FP16",
    "prompt_table_extra_id": "TYPE_UINT64",
    "prompt_vocab_size": "TYPE_INT32",
    "embedding_bias_words": "TYPE_STRING",
    "embedding_bias_weights": "TYPE_FP32",
    "lora_task_id": "TYPE_UINT64",
    "lora_weights": "TYPE_FP16",
    "lora_config": "TYPE_INT32",
    "guided_decoding_guide_type": "TYPE_STRING",
    "guided_decoding_guide": "TYPE_STRING",
}
"""all_models/inflight_batcher_llm/ensemble/config.pbtxt"""

LLMAPI_INPUTS: dict[str, str] = {
    "text_input": "TYPE_STRING",
    "streaming": "TYPE_BOOL",
    "sampling_param_best_of": "TYPE_INT32",
    "sampling_param_temperature": "TYPE_FP32",
    "sampling_param_top_k": "TYPE_INT32",
    "sampling_param_top_p": "TYPE_FP32",
    "sampling_param_frequency_penalty": "TYPE_FP32",
    "sampling_param_presence_penalty": "TYPE_FP32",
    "sampling_param_max_tokens": "TYPE_INT32",
    "sampling_param_stop": "TYPE_STRING",
    "sampling_param_seed": "TYPE_UINT64",
    "sampling_param_exclude_input_from_output": "TYPE_BOOL",
    "sampling_param_return_perf_metrics": "TYPE_BOOL",
    "return_finish_reason": "TYPE_BOOL",
    "return_stop_reason": "TYPE_BOOL",
    "return_cumulative_logprob": "TYPE_BOOL",
    "stop": "TYPE_BOOL",
}
"""all_models/llmapi/tensorrt_llm/config.pbtxt"""

LEGACY_ENSEMBLE_INPUTS: dict[str, str] = {"random_seed": "seed", "min_length": "min_tokens"}
"""Names of the stock ensemble up to tensorrtllm_backend v0.19.0, renamed in c2e65b88 (May 2025):
the gateway sends the new names, which such an ensemble refuses."""

REQUIRED_INPUTS = {"inflight_batcher_llm": ("text_input", "max_tokens"), "llmapi": ("text_input",)}

REQUEST_METRICS, KV_METRICS, GENERAL_METRICS = TRT_REQUESTS, TRT_KV, TRT_GENERAL
FAMILIES = (REQUEST_METRICS, KV_METRICS, GENERAL_METRICS, PENDING)

Dialect = Literal["inflight_batcher_llm", "llmapi", "unknown"]


@dataclass
class Finding:
    severity: Literal["problem", "warning"]
    code: str
    message: str


@dataclass
class Report:
    url: str
    metrics_url: str
    server: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    routed_model: str | None = None
    engine_model: str | None = None
    dialect: Dialect = "unknown"
    inputs: dict[str, Any] = field(default_factory=dict)
    queue_policy: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sidecar: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def problem(self, code: str, message: str) -> None:
        self.findings.append(Finding("problem", code, message))

    def warning(self, code: str, message: str) -> None:
        self.findings.append(Finding("warning", code, message))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


class Unreachable(RuntimeError):
    """The server (or its HTTP API) cannot be reached at all."""


# ---------------------------------------------------------------- pure checks


def detect_dialect(inputs: Sequence[str]) -> Dialect:
    """The stock dialect a model's input names belong to: ``max_tokens`` is the ensemble's,
    ``streaming`` / ``sampling_param_*`` the LLM-API model's."""
    names = set(inputs)
    if "text_input" not in names:
        return "unknown"
    if "max_tokens" in names:
        return "inflight_batcher_llm"
    if "streaming" in names or any(n.startswith("sampling_param_") for n in names):
        return "llmapi"
    return "unknown"


def check_inputs(report: Report, config: dict[str, Any]) -> None:
    """Names unknown to both dialects, required inputs missing, data types that differ."""
    declared = {i["name"]: i for i in config.get("input", [])}
    dialect = detect_dialect(list(declared))
    report.dialect = dialect
    stock = ENSEMBLE_INPUTS if dialect != "llmapi" else LLMAPI_INPUTS
    legacy = sorted(n for n in declared if n in LEGACY_ENSEMBLE_INPUTS)
    foreign = sorted(
        n
        for n in declared
        if n not in ENSEMBLE_INPUTS and n not in LLMAPI_INPUTS and n not in legacy
    )
    other = sorted(n for n in declared if n not in stock and n not in foreign + legacy)
    mistyped = sorted(
        f"{n} is {i.get('data_type')}, stock {stock[n]}"
        for n, i in declared.items()
        if n in stock and i.get("data_type") != stock[n]
    )
    outputs = [o["name"] for o in config.get("output", [])]
    report.inputs = {
        "declared": sorted(declared),
        "required": sorted(n for n, i in declared.items() if not i.get("optional", False)),
        "foreign": foreign,
        "legacy": legacy,
        "other_dialect": other,
        "mistyped": mistyped,
        "outputs": outputs,
    }
    model = config.get("name", "?")
    if dialect == "unknown":
        report.problem(
            "unknown_dialect",
            f"model {model} speaks neither stock dialect: the ensemble needs text_input and "
            "max_tokens, the LLM-API model text_input and streaming / sampling_param_*",
        )
    else:
        missing = [n for n in REQUIRED_INPUTS[dialect] if n not in declared]
        if missing:
            report.problem("missing_inputs", f"model {model} lacks {', '.join(missing)}")
    if foreign:
        report.problem(
            "foreign_inputs",
            f"model {model} has inputs unknown to both stock dialects: {', '.join(foreign)}. "
            "The gateway sends only stock names, never these; where they rename a stock input, "
            "the stock name the gateway sends is not declared, and Triton's /generate passes it "
            "on as a parameter the model ignores (/infer refuses it: 'unexpected inference "
            "input')",
        )
    if legacy:
        renamed = ", ".join(f"{n} (now {LEGACY_ENSEMBLE_INPUTS[n]})" for n in legacy)
        report.problem(
            "legacy_inputs",
            f"model {model} has the names of the stock ensemble up to tensorrtllm_backend "
            f"v0.19.0: {renamed}; the gateway sends the current names, which this model does "
            "not declare: /generate passes them on as parameters the model ignores (no seed, "
            "no minimum length), /infer refuses them ('unexpected inference input')",
        )
    required_foreign = [n for n in foreign if n in report.inputs["required"]]
    if required_foreign:
        report.problem(
            "foreign_required_inputs",
            f"model {model} requires {', '.join(required_foreign)}, which no stock client "
            "sends: every request would fail",
        )
    if other:
        report.warning(
            "mixed_dialects",
            f"model {model} ({dialect}) also declares the other dialect's {', '.join(other)}",
        )
    if mistyped:
        report.problem("mistyped_inputs", f"model {model}: {'; '.join(mistyped)}")
    if "text_output" not in outputs:
        report.problem("no_text_output", f"model {model} has no text_output output")


def queue_policy_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """``dynamic_batching.default_queue_policy`` as numbers, None where there is none (or
    ``max_queue_size`` is 0: Triton's "no limit")."""
    policy = (config.get("dynamic_batching") or {}).get("default_queue_policy")
    if not policy:
        return None
    size = int(policy.get("max_queue_size") or 0)
    if size <= 0:
        return None
    timeout_us = int(policy.get("default_timeout_microseconds") or 0)
    return {
        "max_queue_size": size,
        "timeout_ms": timeout_us / 1000 if timeout_us else None,
        "timeout_action": policy.get("timeout_action", "REJECT"),
    }


def check_queue_policy(report: Report, config: dict[str, Any]) -> None:
    model = config.get("name", "?")
    backend = config.get("backend", "")
    policy = queue_policy_of(config)
    report.queue_policy = {"model": model, "policy": policy}
    if policy is None:
        executor = (
            " (and the tensorrtllm backend, which takes the executor's bound from it, leaves "
            "the executor unbounded too)"
            if backend == "tensorrtllm"
            else ""
        )
        report.problem(
            "no_queue_policy",
            f"model {model} has no dynamic_batching.default_queue_policy with a max_queue_size: "
            "Triton never answers 'Exceeds maximum queue size' (the gateway's 503 + retry); "
            "overflow would then come only as the executor's 500 'Maximum queue size of N "
            f"has been reached'{executor}",
        )
        return
    if policy["timeout_ms"] is None:
        report.warning(
            "no_queue_timeout",
            f"model {model}'s queue policy has no default_timeout_microseconds: a queued "
            "request waits without a deadline ('Request timeout expired' never comes)",
        )
    if policy["timeout_action"] != "REJECT":
        report.warning(
            "queue_timeout_delays",
            f"model {model}'s queue times out with {policy['timeout_action']}, not REJECT: "
            "expired requests are delayed, not answered",
        )


def check_streaming(report: Report, config: dict[str, Any]) -> None:
    """Streaming needs a decoupled model (Triton refuses a streamed request otherwise)."""
    if not (config.get("model_transaction_policy") or {}).get("decoupled", False):
        report.warning(
            "not_decoupled",
            f"model {config.get('name', '?')} is not decoupled: streamed requests "
            "(stream / streaming true) fail; only whole answers work",
        )


def metric_families(text: str) -> dict[str, list[dict[str, str]]]:
    """Label sets per family of interest (counters under their family name)."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in FAMILIES:
            out[family.name] = [dict(s.labels) for s in family.samples]
    return out


def _engine_from_metrics(families: dict[str, list[dict[str, str]]]) -> list[str]:
    return sorted({labels.get("model", "") for labels in families.get(REQUEST_METRICS, [])} - {""})


def check_metrics(report: Report, text: str, engine_model: str, expects_gauges: bool) -> None:
    """Missing engine gauges are a problem where an engine exports them (the ``tensorrtllm``
    backend, an ensemble's engine step), a warning for one python model (the LLM-API way)."""
    families = metric_families(text)
    labelled = {
        name: sorted({labels.get("model", "") for labels in samples} - {""})
        for name, samples in families.items()
    }
    report.metrics = {"families": labelled}
    consequence = {
        REQUEST_METRICS: (
            "the sidecar publishes source=triton: waiting from Triton's pending count only, "
            "active 0, max_active from --max-active (else 1)"
        ),
        KV_METRICS: "kv_fraction is published as 0",
        GENERAL_METRICS: (
            "no iteration_counter: service_ms is the mean time a request is active (Little's "
            "law) instead of ms per iteration, and empty without the request gauges"
        ),
    }
    for family in (REQUEST_METRICS, KV_METRICS, GENERAL_METRICS):
        if engine_model in labelled.get(family, []):
            continue
        where = (
            f"{family} has no series for model {engine_model} (it labels "
            f"{', '.join(labelled[family])})"
            if labelled.get(family)
            else f"{family} absent"
        )
        message = f"{where}: {consequence[family]}"
        if family == REQUEST_METRICS and expects_gauges:
            report.problem("no_engine_metrics", message)
        else:
            report.warning(f"no_{family.removeprefix('nv_trt_llm_')}", message)


def sidecar_preview(
    report: Report,
    text: str,
    model: str,
    engine_model: str,
    arrivals_model: str | None,
    replica_id: str,
) -> None:
    """What ``triage sidecar --model <model> --engine-model <engine_model>`` would publish on
    its first poll (no windows yet: no service time, no hidden-queue estimate)."""
    sample = parse_engine_sample(text, model, engine_model, arrivals_model)
    now = int(time.time() * 1000)
    state = ReplicaState(
        replica_id=replica_id,
        model=model,
        api_base=report.url,
        waiting=sample.pending,
        active=sample.active,
        max_active=sample.max_active or 1,
        kv_fraction=sample.kv_fraction,
        healthy=True,
        state="healthy",
        source=sample.source,
        ts_ms=now,
        sample_ts_ms=now,
    )
    arrivals = f" --arrivals-model {arrivals_model}" if arrivals_model else " --arrivals-model ''"
    report.sidecar = {
        "command": (
            f"triage sidecar --replica-id {replica_id} --model {model} --engine-model "
            f"{engine_model}{arrivals} --triton-url {report.url} --metrics-url "
            f"{report.metrics_url}"
        ),
        "sample": asdict(sample),
        "state": state.model_dump(exclude={"ts_ms", "sample_ts_ms"}),
        "service_basis": (
            "ms per engine iteration (iteration_counter)"
            if sample.iterations is not None
            else "mean time a request is active (Little's law)"
            if sample.source == "trtllm"
            else "none (no engine gauges)"
        ),
        "hidden_queue_estimate": (
            "yes (arrivals - completions - active)"
            if sample.max_active is not None
            and sample.arrivals is not None
            and sample.completions is not None
            else "no: the executor's queue behind max is invisible to routing"
        ),
    }
    if sample.max_active is None:
        report.warning(
            "no_max_active",
            "the metrics give no max_active (nv_trt_llm_request_metrics request_type=max): "
            "start the sidecar with --max-active N (the batch slots), else it publishes 1 and "
            "routing treats the replica as one slot",
        )


# ---------------------------------------------------------------- talking to the server


def _get_json(client: httpx.Client, url: str) -> Any:
    response = client.get(url)
    response.raise_for_status()
    return response.json()


def _pick_routed(configs: dict[str, dict[str, Any]]) -> str | None:
    """The model clients call: an ensemble taking text_input first, then any model taking
    text_input (a model some ensemble schedules is a step, not the routed model)."""
    steps = {
        step.get("model_name")
        for c in configs.values()
        for step in (c.get("ensemble_scheduling") or {}).get("step", [])
    }
    text_models = [
        name
        for name, c in configs.items()
        if any(i.get("name") == "text_input" for i in c.get("input", []))
    ]
    ensembles = [n for n in text_models if configs[n].get("platform") == "ensemble"]
    for group in (ensembles, [n for n in text_models if n not in steps]):
        if group:
            return "ensemble" if "ensemble" in group else sorted(group)[0]
    return None


def _pick_engine(
    configs: dict[str, dict[str, Any]], routed: str, families: dict[str, list[dict[str, str]]]
) -> str:
    """The model whose nv_trt_llm_* series carry the load: for an ensemble the step on the
    tensorrtllm backend, else the step the metrics label, else one named tensorrt_llm; for a
    plain model the model itself."""
    steps = [
        s.get("model_name", "")
        for s in (configs[routed].get("ensemble_scheduling") or {}).get("step", [])
    ]
    if not steps:
        return routed
    for step in steps:
        if configs.get(step, {}).get("backend") == "tensorrtllm":
            return step
    labelled = _engine_from_metrics(families)
    for step in steps:
        if step in labelled:
            return step
    return "tensorrt_llm" if "tensorrt_llm" in steps else steps[0]


def check_replica(
    url: str,
    model: str | None = None,
    metrics_url: str | None = None,
    replica_id: str = "replica-0",
    timeout_s: float = 5.0,
) -> Report:
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL must be an http(s) URL, got {url!r}")
    metrics_url = metrics_url or f"{parts.scheme}://{parts.hostname}:8002/metrics"
    report = Report(url=url, metrics_url=metrics_url)
    with httpx.Client(timeout=timeout_s) as client:
        try:
            server = _get_json(client, f"{url}/v2")
            ready = client.get(f"{url}/v2/health/ready").status_code == 200
            index = client.post(f"{url}/v2/repository/index", json={})
            index.raise_for_status()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unreachable(f"{url}: {exc}") from exc
        report.server = {
            "name": server.get("name"),
            "version": server.get("version"),
            "ready": ready,
        }
        if not ready:
            report.problem("not_ready", f"{url}/v2/health/ready is not 200")
        report.models = list(index.json())
        for entry in report.models:
            name, state = entry.get("name", ""), entry.get("state", "")
            if state == "READY":
                try:
                    report.configs[name] = _get_json(client, f"{url}/v2/models/{name}/config")
                except httpx.HTTPError as exc:
                    report.problem("config_unreadable", f"model {name}: config: {exc}")
            elif state == "UNAVAILABLE":
                reason = entry.get("reason") or "no reason given"
                hint = (
                    " (the tensorrtllm backend reads gpt_model_type, gpt_model_path, "
                    "tokenizer_dir, guided_decoding_backend and xgrammar_tokenizer_info_path "
                    "without a default: each must be in config.pbtxt, empty turns guided "
                    "decoding off; triage build-engine writes them)"
                    if "Cannot find parameter with name" in reason
                    else ""
                )
                report.problem("model_unavailable", f"model {name} failed to load: {reason}{hint}")
        try:
            response = client.get(metrics_url)
            response.raise_for_status()
            metrics_text: str | None = response.text
        except httpx.HTTPError as exc:
            metrics_text = None
            report.problem(
                "metrics_unreachable",
                f"metrics at {metrics_url}: {exc}; the sidecar would publish nothing (pass "
                "--metrics-url where Triton serves them elsewhere)",
            )
    return analyse(report, metrics_text, model, replica_id)


def analyse(report: Report, metrics_text: str | None, model: str | None, replica_id: str) -> Report:
    """The checks on what was read (``report.configs``, the metrics text): pure, no I/O."""
    url = report.url
    routed = model or _pick_routed(report.configs)
    if routed is None:
        report.problem("no_text_model", "no ready model takes text_input")
        return report
    if routed not in report.configs:
        report.problem("model_not_ready", f"model {routed} is not ready on {url}")
        return report
    report.routed_model = routed
    check_inputs(report, report.configs[routed])
    if report.dialect != "unknown":
        # the LiteLLM deployment the gateway needs for it (plugins/triton_provider)
        report.deployment = {
            "litellm_params": {"model": f"triage_triton/{routed}", "api_base": url},
            "model_info": {"id": replica_id, "triage_triton": {"dialect": report.dialect}},
        }
    families = metric_families(metrics_text) if metrics_text is not None else {}
    engine = _pick_engine(report.configs, routed, families)
    report.engine_model = engine
    engine_config = report.configs.get(engine)
    if engine_config is None:
        report.problem("engine_not_ready", f"the ensemble's engine model {engine} is not ready")
    else:
        check_queue_policy(report, engine_config)
        check_streaming(report, engine_config)
    if metrics_text is not None:
        expects_gauges = (
            engine_config is not None and engine_config.get("backend") == "tensorrtllm"
        ) or report.configs[routed].get("platform") == "ensemble"
        check_metrics(report, metrics_text, engine, expects_gauges)
        steps = [
            step.get("model_name")
            for step in (report.configs[routed].get("ensemble_scheduling") or {}).get("step", [])
        ]
        arrivals = DEFAULT_ARRIVALS_MODEL if DEFAULT_ARRIVALS_MODEL in steps else None
        sidecar_preview(report, metrics_text, routed, engine, arrivals, replica_id)
    return report


# ---------------------------------------------------------------- output


def render(report: Report) -> str:
    lines = [
        f"triton     {report.url}  ({report.server.get('name')} {report.server.get('version')})"
    ]
    lines.append(f"metrics    {report.metrics_url}")
    lines.append("models")
    for entry in report.models:
        name = entry.get("name", "")
        config = report.configs.get(name, {})
        kind = config.get("platform") or config.get("backend") or ""
        reason = f"  {entry['reason']}" if entry.get("reason") else ""
        lines.append(f"  {name:<24} {entry.get('state', 'not loaded'):<12} {kind}{reason}")
    if report.routed_model:
        lines.append(
            f"routed     {report.routed_model}  dialect {report.dialect}  engine "
            f"{report.engine_model}"
        )
        inputs = report.inputs
        lines.append(f"inputs     {', '.join(inputs.get('declared', []))}")
        if inputs.get("foreign"):
            lines.append(f"  unknown to both dialects: {', '.join(inputs['foreign'])}")
        if inputs.get("legacy"):
            lines.append(f"  names of the stock ensemble <= v0.19.0: {', '.join(inputs['legacy'])}")
    if report.queue_policy:
        policy = report.queue_policy["policy"]
        shown = (
            f"max_queue_size {policy['max_queue_size']}, timeout "
            f"{policy['timeout_ms'] if policy['timeout_ms'] is not None else 'none'} ms, "
            f"{policy['timeout_action']}"
            if policy
            else "none"
        )
        lines.append(f"queue      {report.queue_policy['model']}: {shown}")
    if report.metrics:
        for family, models in sorted(report.metrics["families"].items()):
            lines.append(f"metric     {family}: {', '.join(models) or '(no model label)'}")
    if report.sidecar:
        state = report.sidecar["state"]
        lines.append(
            f"sidecar    source {state['source']}  waiting {state['waiting']}  active "
            f"{state['active']}  max_active {state['max_active']}  kv_fraction "
            f"{state['kv_fraction']:.3f}  service: {report.sidecar['service_basis']}"
        )
        lines.append(f"  run: {report.sidecar['command']}")
    if report.deployment:
        lines.append(f"gateway    {json.dumps(report.deployment)}")
    for finding in report.findings:
        lines.append(f"{finding.severity.upper():<10} {finding.code}: {finding.message}")
    lines.append(
        "OK" if report.ok else f"{len(report.problems)} problem(s): the replica is not ready"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="triage check-replica",
        description="Report what triage will see of a running Triton server.",
    )
    parser.add_argument("url", help="Triton's HTTP base URL, e.g. http://10.0.0.5:8000")
    parser.add_argument("--model", help="the model clients call (default: detect)")
    parser.add_argument(
        "--metrics-url", help="Triton's metrics (default: the URL's host, port 8002, /metrics)"
    )
    parser.add_argument("--replica-id", default="replica-0", help="for the sidecar preview")
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = check_replica(
            args.url, args.model, args.metrics_url, args.replica_id, args.timeout
        )
    except ValueError as exc:
        print(f"triage check-replica: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"triage check-replica: cannot reach Triton: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    if not report.ok:
        for finding in report.problems:
            print(f"triage check-replica: {finding.code}: {finding.message}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
