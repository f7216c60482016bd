"""``triage check-replica``: against real tritonservers (the CPU stand-in, and small python
models written here: one without a queue policy, one with foreign input names, one speaking
the stock LLM-API dialect), and its pure checks against the upstream fixtures."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.paths import free_port
from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from sidecar.check_replica import (
    ENSEMBLE_INPUTS,
    LLMAPI_INPUTS,
    Report,
    analyse,
    check_replica,
    detect_dialect,
    main,
    queue_policy_of,
)
from triage.cli import main as triage_main

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
STOCK = json.loads((UPSTREAM / "build_stock_names.json").read_text())

TINY_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            tensor = pb_utils.Tensor("text_output", np.array(text, dtype=object))
            out.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return out
"""

QUEUE = """dynamic_batching {
  default_queue_policy { max_queue_size: 8 timeout_action: REJECT default_timeout_microseconds: 5000000 }
}"""


def _input(name: str, data_type: str, optional: bool = True) -> str:
    flag = " optional: true" if optional else ""
    return f'{{ name: "{name}" data_type: {data_type} dims: [ 1 ]{flag} }}'


def tiny_model(repo: Path, name: str, inputs: list[str], queue: bool) -> None:
    """A python model answering text_output = text_input, with ``inputs`` declared."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(TINY_MODEL)
    config = f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 8
        {QUEUE if queue else ""}
        input [ {", ".join(inputs)} ]
        output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
        instance_group [ {{ kind: KIND_CPU count: 1 }} ]
    """
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))


def tiny_ensemble(repo: Path, name: str, step: str) -> None:
    """An ensemble ``name`` (text_input, max_tokens -> text_output) over the model ``step``."""
    (repo / name / "1").mkdir(parents=True)
    config = f"""
        name: "{name}"
        platform: "ensemble"
        max_batch_size: 8
        input [ {", ".join(STOCK_WIRE[:2])} ]
        output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
        ensemble_scheduling {{ step [ {{
          model_name: "{step}" model_version: -1
          input_map {{ key: "text_input" value: "text_input" }}
          input_map {{ key: "max_tokens" value: "max_tokens" }}
          output_map {{ key: "text_output" value: "text_output" }}
        }} ] }}
    """
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))


STOCK_WIRE = [
    _input("text_input", "TYPE_STRING", optional=False),
    _input("max_tokens", "TYPE_INT32", optional=False),
    _input("stream", "TYPE_BOOL"),
    _input("seed", "TYPE_UINT64"),
]
LLMAPI_WIRE = [
    _input("text_input", "TYPE_STRING", optional=False),
    _input("streaming", "TYPE_BOOL"),
    _input("sampling_param_max_tokens", "TYPE_INT32"),
]
FOREIGN_WIRE = [
    _input("text_input", "TYPE_STRING", optional=False),
    _input("max_tokens", "TYPE_INT32", optional=False),
    _input("random_seed", "TYPE_UINT64"),
    _input("prompt_style", "TYPE_STRING", optional=False),
]


# ---------------------------------------------------------------- pure checks


def test_the_dialects_are_upstreams() -> None:
    ensemble = {i["name"]: i["data_type"] for i in STOCK["models"]["ensemble"]["inputs"]}
    assert ensemble == ENSEMBLE_INPUTS
    llmapi = {i["name"]: i["data_type"] for i in STOCK["llmapi"]["inputs"]}
    assert llmapi == LLMAPI_INPUTS


def test_the_dialects_agree_with_the_providers_fixtures() -> None:
    for name, names in (
        ("ensemble_inputs.json", ENSEMBLE_INPUTS),
        ("llmapi_inputs.json", LLMAPI_INPUTS),
    ):
        path = UPSTREAM / name
        if not path.exists():
            continue  # written by the provider's work; checked once it is there
        inputs = {i["name"]: i["data_type"] for i in json.loads(path.read_text())["inputs"]}
        assert inputs == names, name


@pytest.mark.parametrize(
    ("names", "dialect"),
    [
        (["text_input", "max_tokens", "stream"], "inflight_batcher_llm"),
        (["text_input", "streaming", "sampling_param_top_p"], "llmapi"),
        (["text_input"], "unknown"),
        (["prompt", "max_tokens"], "unknown"),
    ],
)
def test_detect_dialect(names: list[str], dialect: str) -> None:
    assert detect_dialect(names) == dialect


def test_queue_policy_of() -> None:
    assert queue_policy_of({}) is None
    # Triton's JSON shows an unset policy as zeros: max_queue_size 0 is "no limit"
    zero = {"dynamic_batching": {"default_queue_policy": {"max_queue_size": 0}}}
    assert queue_policy_of(zero) is None
    policy = {
        "max_queue_size": "16",
        "default_timeout_microseconds": "60000000",
        "timeout_action": "REJECT",
    }
    assert queue_policy_of({"dynamic_batching": {"default_queue_policy": policy}}) == {
        "max_queue_size": 16,
        "timeout_ms": 60000.0,
        "timeout_action": "REJECT",
    }


def _json_config(name: str, model: dict, **extra: object) -> dict:
    """A model's configuration as Triton's /v2/models/<m>/config shows it."""
    inputs = [
        {"name": i["name"], "data_type": i["data_type"], "optional": i["optional"]}
        for i in model["inputs"]
    ]
    outputs = [{"name": o, "data_type": "TYPE_STRING"} for o in model["outputs"]]
    return {"name": name, "input": inputs, "output": outputs, **extra}


def stock_engine_replica() -> tuple[Report, str]:
    """What check-replica reads from NVIDIA's stock inflight_batcher_llm repository served by
    the C++ backend: the configs of build_stock_names.json, the queue policy of the stock
    tensorrt_llm template (max_queue_size only), and the backend's gauges."""
    models = STOCK["models"]
    steps = [{"model_name": m} for m in ("preprocessing", "tensorrt_llm", "postprocessing")]
    configs = {
        "ensemble": _json_config(
            "ensemble",
            models["ensemble"],
            platform="ensemble",
            ensemble_scheduling={"step": steps},
        ),
        "preprocessing": _json_config("preprocessing", models["preprocessing"], backend="python"),
        "postprocessing": _json_config(
            "postprocessing", models["postprocessing"], backend="python"
        ),
        "tensorrt_llm": _json_config(
            "tensorrt_llm",
            models["tensorrt_llm"],
            backend="tensorrtllm",
            model_transaction_policy={"decoupled": True},
            dynamic_batching={"default_queue_policy": {"max_queue_size": "64"}},
        ),
    }
    report = Report(url="http://10.0.0.5:8000", metrics_url="http://10.0.0.5:8002/metrics")
    report.configs = configs
    report.models = [{"name": n, "version": "1", "state": "READY"} for n in configs]
    engine = 'model="tensorrt_llm",version="1"'
    metrics = "\n".join(
        [
            "# TYPE nv_trt_llm_request_metrics gauge",
            *(
                f'nv_trt_llm_request_metrics{{{engine},request_type="{kind}"}} {value}'
                for kind, value in (("active", 3), ("max", 64), ("scheduled", 3), ("waiting", 0))
            ),
            "# TYPE nv_trt_llm_kv_cache_block_metrics gauge",
            f'nv_trt_llm_kv_cache_block_metrics{{{engine},kv_cache_block_type="fraction"}} 0.25',
            "# TYPE nv_trt_llm_general_metrics gauge",
            f'nv_trt_llm_general_metrics{{{engine},general_type="iteration_counter"}} 1000',
            "# TYPE nv_inference_pending_request_count gauge",
            'nv_inference_pending_request_count{model="ensemble",version="1"} 0',
            "",
        ]
    )
    return report, metrics


def test_a_stock_engine_replica_passes_with_a_timeout_warning() -> None:
    report, metrics = stock_engine_replica()
    analyse(report, metrics, None, "llama-a")
    assert report.ok, report.problems
    assert (report.routed_model, report.engine_model) == ("ensemble", "tensorrt_llm")
    assert report.dialect == "inflight_batcher_llm"
    assert report.inputs["foreign"] == [] and report.inputs["legacy"] == []
    warnings = {f.code for f in report.findings if f.severity == "warning"}
    assert warnings == {"no_queue_timeout"}  # the stock template sets max_queue_size only
    state = report.sidecar["state"]
    assert (state["source"], state["active"], state["max_active"]) == ("trtllm", 3, 64)
    assert state["kv_fraction"] == 0.25
    assert (
        "--engine-model tensorrt_llm --arrivals-model preprocessing" in (report.sidecar["command"])
    )
    assert report.deployment["litellm_params"]["model"] == "triage_triton/ensemble"


def test_a_pre_2025_stock_ensemble_is_named() -> None:
    report, metrics = stock_engine_replica()
    for item in report.configs["ensemble"]["input"]:
        item["name"] = {"seed": "random_seed", "min_tokens": "min_length"}.get(
            item["name"], item["name"]
        )
    analyse(report, metrics, None, "old")
    assert {f.code for f in report.problems} == {"legacy_inputs"}
    assert report.inputs["legacy"] == ["min_length", "random_seed"]


def test_a_stock_llmapi_model_has_no_queue_policy() -> None:
    config = _json_config(
        "tensorrt_llm",
        {"inputs": STOCK["llmapi"]["inputs"], "outputs": ["text_output"]},
        backend="python",
    )
    report = Report(url="http://h:8000", metrics_url="http://h:8002/metrics")
    report.configs = {"tensorrt_llm": config}
    analyse(report, "", None, "b")
    assert report.dialect == "llmapi"
    assert {f.code for f in report.problems} == {"no_queue_policy"}
    warnings = {f.code for f in report.findings if f.severity == "warning"}
    assert {"no_request_metrics", "no_max_active", "not_decoupled"} <= warnings


def test_bad_url_and_unreachable_server_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ftp://host:8000"]) == 2
    assert main([f"http://127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 2
    assert "cannot reach Triton" in capsys.readouterr().err


# ---------------------------------------------------------------- against real servers


@pytest.fixture(scope="module")
def standin(workdir: Path) -> Iterator[TritonServer]:
    server = start_standin_replica("check", StandinSettings(), workdir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(workdir: Path) -> Iterator[TritonServer]:
    repo = workdir / "models-check-tiny"
    tiny_model(repo, "noqueue", STOCK_WIRE, queue=False)
    tiny_model(repo, "foreign", FOREIGN_WIRE, queue=True)
    tiny_model(repo, "llmapi", LLMAPI_WIRE, queue=True)
    tiny_model(repo, "engine", STOCK_WIRE[:2], queue=True)
    tiny_ensemble(repo, "front", "engine")
    server = TritonServer(
        name="check-tiny",
        repository=repo,
        models=["noqueue", "foreign", "llmapi", "front"],
        workdir=workdir,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.integration
def test_a_good_standin_replica_passes(
    standin: TritonServer, capsys: pytest.CaptureFixture[str]
) -> None:
    report = check_replica(standin.http_url, metrics_url=standin.metrics_url)
    assert report.ok, report.problems
    assert report.dialect == "inflight_batcher_llm"
    assert report.routed_model in standin.models
    assert report.queue_policy["policy"]["max_queue_size"] > 0
    assert report.engine_model in report.metrics["families"]["nv_trt_llm_request_metrics"]
    assert report.sidecar["state"]["source"] == "trtllm"
    assert report.sidecar["state"]["max_active"] >= 1
    # the CLI: human report, exit 0
    assert (
        triage_main(["check-replica", standin.http_url, "--metrics-url", standin.metrics_url]) == 0
    )
    out = capsys.readouterr().out
    assert "dialect inflight_batcher_llm" in out and out.rstrip().endswith("OK")


@pytest.mark.integration
def test_a_model_without_a_queue_policy_is_named(
    tiny: TritonServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [tiny.http_url, "--model", "noqueue", "--metrics-url", tiny.metrics_url, "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    codes = {f["code"]: f for f in report["findings"] if f["severity"] == "problem"}
    assert "no_queue_policy" in codes
    assert "Exceeds maximum queue size" in codes["no_queue_policy"]["message"]
    assert "500" in codes["no_queue_policy"]["message"]
    # one python model without engine gauges (the LLM-API way): a warning naming the
    # consequence, not a problem (an ensemble's engine step without them is one, below)
    assert "no_engine_metrics" not in codes
    warnings = {f["code"]: f["message"] for f in report["findings"]}
    assert "source=triton" in warnings["no_request_metrics"]
    assert report["dialect"] == "inflight_batcher_llm"
    assert report["sidecar"]["state"]["source"] == "triton"
    assert "no_queue_policy" in captured.err


@pytest.mark.integration
def test_foreign_input_names_are_named(tiny: TritonServer) -> None:
    report = check_replica(tiny.http_url, model="foreign", metrics_url=tiny.metrics_url)
    assert not report.ok
    codes = {f.code: f.message for f in report.problems}
    assert report.inputs["foreign"] == ["prompt_style"]
    assert "prompt_style" in codes["foreign_inputs"]
    # the stock ensemble's name up to tensorrtllm_backend v0.19.0, named as such
    assert report.inputs["legacy"] == ["random_seed"]
    assert "random_seed (now seed)" in codes["legacy_inputs"]
    assert "prompt_style" in codes["foreign_required_inputs"]
    assert "no_queue_policy" not in codes
    assert report.queue_policy["policy"] == {
        "max_queue_size": 8,
        "timeout_ms": 5000.0,
        "timeout_action": "REJECT",
    }


@pytest.mark.integration
def test_the_llmapi_dialect_without_engine_metrics_is_a_warning(tiny: TritonServer) -> None:
    report = check_replica(tiny.http_url, model="llmapi", metrics_url=tiny.metrics_url)
    assert report.dialect == "llmapi"
    assert report.ok, report.problems
    warnings = {f.code: f.message for f in report.findings if f.severity == "warning"}
    assert "source=triton" in warnings["no_request_metrics"]
    assert "--max-active" in warnings["no_max_active"]


@pytest.mark.integration
def test_detects_the_ensemble_and_its_engine_step(tiny: TritonServer) -> None:
    report = check_replica(tiny.http_url, metrics_url=tiny.metrics_url)
    names = {"noqueue", "foreign", "llmapi", "engine", "front"}
    assert {m["name"] for m in report.models} == names
    assert set(report.configs) == names
    # the ensemble is what clients call; its step holds the queue (and would hold the gauges)
    assert (report.routed_model, report.engine_model) == ("front", "engine")
    assert report.dialect == "inflight_batcher_llm"
    assert report.queue_policy["model"] == "engine"
    assert report.queue_policy["policy"]["max_queue_size"] == 8
    codes = {f.code for f in report.problems}
    assert codes == {"no_engine_metrics"}, report.problems
    warnings = {f.code for f in report.findings if f.severity == "warning"}
    assert "not_decoupled" in warnings  # the tiny engine answers whole responses only


@pytest.mark.integration
def test_an_llmapi_standin_is_detected_and_its_missing_gauges_are_warnings(
    workdir: Path,
) -> None:
    settings = StandinSettings.model_validate({"model_name": "llm", "dialect": "llmapi"})
    server = start_standin_replica("check-llmapi", settings, workdir)
    try:
        report = check_replica(server.http_url, metrics_url=server.metrics_url)
    finally:
        server.stop()
    assert (report.routed_model, report.engine_model, report.dialect) == ("llm", "llm", "llmapi")
    problems = {f.code for f in report.problems}
    assert not problems & {"no_engine_metrics", "foreign_inputs", "unknown_dialect"}, problems
    warnings = {f.code for f in report.findings if f.severity == "warning"}
    assert {"no_request_metrics", "no_max_active"} <= warnings
    assert report.sidecar["state"]["source"] == "triton"
    assert report.deployment["model_info"]["triage_triton"] == {"dialect": "llmapi"}
    assert report.deployment["litellm_params"]["model"] == "triage_triton/llm"


BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("Cannot find parameter with name: tokenizer_dir")
"""


@pytest.mark.integration
def test_a_model_that_failed_to_load_is_named_with_the_reason(workdir: Path) -> None:
    repo = workdir / "models-check-broken"
    tiny_model(repo, "good", STOCK_WIRE, queue=True)
    tiny_model(repo, "broken", STOCK_WIRE, queue=True)
    (repo / "broken" / "1" / "model.py").write_text(BROKEN_MODEL)
    server = TritonServer(name="check-broken", repository=repo, models=["good"], workdir=workdir)
    server.start()
    try:
        with httpx.Client(timeout=30) as client:
            load = client.post(f"{server.http_url}/v2/repository/models/broken/load")
        assert load.status_code == 400
        report = check_replica(server.http_url, metrics_url=server.metrics_url)
    finally:
        server.stop()
    problems = {f.code: f.message for f in report.problems}
    assert "Cannot find parameter with name: tokenizer_dir" in problems["model_unavailable"]
    assert "triage build-engine writes them" in problems["model_unavailable"]
    assert report.routed_model == "good"
