"""Cancellation on a real tritonserver 2.51: what reaches the stand-in's engine, like TRT-LLM.

What makes Triton 2.51 cancel a request of a decoupled python model (found here, and read in its
``src/http_server.cc``): the HTTP frontend pauses reading a request's connection until the first
response of that request is sent (``evhtp_request_pause``; ``StartResponse`` resumes it), and its
``RequestFiniHook`` calls ``TRITONSERVER_InferenceRequestCancel`` when the connection goes. So,
for a model the client calls directly (the ``llmapi`` dialect, one python model):

* a ``/generate_stream`` request is cancelled at its next event after the client closed;
* a ``/generate`` request (one response, at the end) is never cancelled: it runs to the end;
* a request still in the executor queue (no response yet) is cancelled over HTTP only once it
  is admitted and sends its first event; over gRPC (``stop_stream(cancel_requests=True)``) at once.

Through an ensemble (the ``ensemble`` dialect, NVIDIA's stock shape) nothing reaches the engine:
Triton's ensemble scheduler (core r24.10 ``EnsembleContext::ScheduleSteps``, unchanged at the
core's HEAD) passes a cancellation only to steps it schedules after it, and the engine step is
scheduled once, at the start. The engine keeps generating until ``max_tokens``.

The llmapi dialect exports no ``nv_trt_llm_*`` gauge, so these tests watch the stand-in-only
counter ``triage_request_cancelled`` and whether the single batch slot is free (a short request
is served at once).
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica

pytestmark = pytest.mark.integration

MODEL = "standin"
ENGINE = "tensorrt_llm"
HUGE = 100_000  # tokens: 1000 s at 10 ms a step, i.e. never ends by itself in a test


@pytest.fixture(scope="module")
def replica(workdir: Path) -> Iterator[TritonServer]:
    """LLM-API dialect, one active request at most: a second one waits in the executor queue."""
    settings = StandinSettings(
        dialect="llmapi", max_active=1, engine_queue_size=4, decode_ms_per_token=10
    )
    server = start_standin_replica("cancel", settings, workdir, ready_timeout_s=90)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ensemble_replica(workdir: Path) -> Iterator[TritonServer]:
    settings = StandinSettings(max_active=1, engine_queue_size=4, decode_ms_per_token=10)
    server = start_standin_replica("cancel-ens", settings, workdir, ready_timeout_s=90)
    yield server
    server.stop()


def metrics(server: TritonServer) -> dict[str, float]:
    """The engine's gauges (ensemble dialect), the stand-in-only ``cancelled`` counter and
    Triton's own ``success`` count of the served model."""
    out: dict[str, float] = {"cancelled": 0.0}
    text = httpx.get(server.metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if family.name == "nv_trt_llm_request_metrics" and model == ENGINE:
                out[sample.labels["request_type"]] = sample.value
            elif family.name == "triage_request_cancelled" and model in (MODEL, ENGINE):
                out["cancelled"] = sample.value
            elif family.name == "nv_inference_request_success" and model == MODEL:
                out["success"] = sample.value
    return out


def wait_for(server: TritonServer, timeout_s: float, **expected: float) -> float:
    """Seconds until every ``expected`` metric has its value (fails after ``timeout_s``)."""
    start = time.monotonic()
    while True:
        seen = metrics(server)
        if all(seen.get(k) == v for k, v in expected.items()):
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"wanted {expected}, have {seen}"
        time.sleep(0.02)


class RawRequest:
    """A generate request on a socket of its own: closing it is a client that goes away."""

    def __init__(
        self, server: TritonServer, endpoint: str, max_tokens: int = HUGE, llmapi: bool = True
    ) -> None:
        stream = endpoint == "generate_stream"
        fields = (
            {"sampling_param_max_tokens": max_tokens, "streaming": stream}
            if llmapi
            else {"max_tokens": max_tokens, "stream": stream}
        )
        body = json.dumps({"text_input": "tell me a long story", **fields}).encode()
        head = (
            f"POST /v2/models/{MODEL}/{endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
        self.sock.sendall(head.encode() + body)
        self.received = b""

    def read_for(self, seconds: float) -> int:
        """Read what arrives for ``seconds``; the number of SSE events received so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.received += chunk
        return self.received.count(b"data: ")

    def close(self) -> None:
        self.sock.close()


def grpc_stream(server: TritonServer, max_tokens: int) -> tuple[Any, queue.Queue[Any]]:
    """A decoupled stream request over gRPC; ``stop_stream(cancel_requests=True)`` cancels it."""
    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    client.start_stream(callback=lambda result, error: results.put(error or result))
    inputs = []
    for name, dtype, value in (
        ("text_input", "BYTES", np.array([[b"queued one"]], dtype=np.object_)),
        ("sampling_param_max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
        ("streaming", "BOOL", np.array([[True]])),
    ):
        tensor = grpcclient.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer(MODEL, inputs)
    return client, results


def assert_served_promptly(server: TritonServer) -> None:
    start = time.monotonic()
    response = httpx.post(
        f"{server.http_url}/v2/models/{MODEL}/generate",
        json={"text_input": "next please", "sampling_param_max_tokens": 5},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["text_output"].split()) == 5
    assert time.monotonic() - start < 1.0  # 5 steps of 10 ms: nothing is in the way


def test_closed_stream_frees_its_batch_slot_at_once(replica: TritonServer) -> None:
    before = metrics(replica)
    stream = RawRequest(replica, "generate_stream")
    assert stream.read_for(1.0) > 10  # it was generating
    stream.close()
    assert wait_for(replica, 1.0, cancelled=before["cancelled"] + 1) < 1.0
    # Triton's success count of a decoupled python model grows when execute() returns, at
    # arrival: the cancelled request was counted then (the real LLM-API model's alike)
    assert metrics(replica)["success"] == before["success"] + 1
    assert_served_promptly(replica)


def test_request_cancelled_while_in_the_executor_queue_leaves_it_at_once(
    replica: TritonServer,
) -> None:
    busy = RawRequest(replica, "generate_stream")
    assert busy.read_for(0.3) > 0
    client, results = grpc_stream(replica, HUGE)
    try:
        time.sleep(0.3)
        assert results.empty()  # queued behind busy: no token yet
        before = metrics(replica)
        client.stop_stream(cancel_requests=True)
        assert wait_for(replica, 1.0, cancelled=before["cancelled"] + 1) < 1.0
    finally:
        client.close()
    error = results.get(timeout=5)
    assert isinstance(error, Exception) and "CANCELLED" in str(error)
    events = busy.read_for(0.2)
    assert busy.read_for(0.2) > events  # busy still runs
    busy.close()
    wait_for(replica, 1.0, cancelled=before["cancelled"] + 2)
    assert_served_promptly(replica)


def test_http_queued_stream_is_cancelled_only_once_admitted(replica: TritonServer) -> None:
    """Triton 2.51 reads nothing from a connection before the request's first response."""
    busy = RawRequest(replica, "generate_stream")
    assert busy.read_for(0.3) > 0
    queued = RawRequest(replica, "generate_stream")
    assert queued.read_for(0.3) == 0  # behind busy
    before = metrics(replica)
    queued.close()
    time.sleep(0.5)
    assert metrics(replica)["cancelled"] == before["cancelled"]  # not noticed: no response yet
    busy.close()
    # busy is dropped at its next step; the queued one is admitted, sends one event, is dropped
    wait_for(replica, 1.0, cancelled=before["cancelled"] + 2)
    assert_served_promptly(replica)


def test_http_generate_is_not_cancelled_by_a_disconnect(replica: TritonServer) -> None:
    """Triton 2.51 keeps a /generate request running when its client leaves (hence the provider
    serves non-streaming calls from /generate_stream)."""
    before = metrics(replica)
    request = RawRequest(replica, "generate", max_tokens=250)
    assert request.read_for(0.3) == 0  # one response, at the end
    request.close()
    time.sleep(0.7)
    assert metrics(replica)["cancelled"] == before["cancelled"]
    start = time.monotonic()
    response = httpx.post(
        f"{replica.http_url}/v2/models/{MODEL}/generate",
        json={"text_input": "next please", "sampling_param_max_tokens": 5},
        timeout=10,
    )
    assert response.status_code == 200
    assert time.monotonic() - start > 0.8  # it waited for the abandoned one (2.5 s) to end
    assert metrics(replica)["cancelled"] == before["cancelled"]


def test_through_the_ensemble_a_cancel_never_reaches_the_engine(
    ensemble_replica: TritonServer,
) -> None:
    """NVIDIA's stock shape on Triton 2.51: the client's disconnect cancels the ensemble request
    only; the engine step keeps its executor slot to ``max_tokens`` (gRPC's cancel alike)."""
    before = metrics(ensemble_replica)
    stream = RawRequest(ensemble_replica, "generate_stream", max_tokens=150, llmapi=False)
    assert stream.read_for(0.3) > 5
    stream.close()
    time.sleep(0.5)
    seen = metrics(ensemble_replica)
    assert seen["active"] == 1 and seen["cancelled"] == before["cancelled"], seen
    wait_for(ensemble_replica, 5.0, active=0)  # ... until its 150 tokens are done
    assert metrics(ensemble_replica)["cancelled"] == before["cancelled"]
