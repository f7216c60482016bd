"""TensorRT-LLM's LLM API (PyTorch backend) as a Triton python model (written for triage).

The wire is NVIDIA's stock inflight-batcher *ensemble's* (``text_input``, ``max_tokens``,
``stream``, ``seed``, ``min_tokens``, ... → ``text_output``; the gateway's
``inflight_batcher_llm`` dialect), not NVIDIA's LLM-API model's (``streaming``,
``sampling_param_*``). ``model.yaml`` (next to this file) holds the ``tensorrt_llm.LLM`` arguments
(``model``, ``tensor_parallel_size``, ...; the LLM API starts its own MPI workers for TP>1).
``gpu_device_ids`` (config.pbtxt) becomes ``CUDA_VISIBLE_DEVICES`` before tensorrt_llm is
imported. At most ``max_active + engine_queue_size`` requests are in flight; the next one gets
TensorRT-LLM's executor message, which the gateway classifies as engine overflow (503).
tensorrt_llm is imported in ``initialize`` only: the pure helpers are unit-tested without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
import yaml

# stock ensemble input -> tensorrt_llm.SamplingParams field
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "end_id": "end_id",
    "pad_id": "pad_id",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "length_penalty": "length_penalty",
    "min_tokens": "min_tokens",
}
LIST_FIELDS = {"stop_words": "stop", "bad_words": "bad"}
OVERFLOW = "Maximum queue size of {size} has been reached, please try again later"


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def llm_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """``tensorrt_llm.LLM`` keyword arguments from model.yaml (``triton_config`` dropped)."""
    if "model" not in config:
        raise ValueError("model.yaml has no 'model' (the checkpoint directory)")
    return {k: v for k, v in config.items() if k != "triton_config"}


def _scalar(value: np.ndarray) -> Any:
    item = value.reshape(-1)[0]
    return item.item() if hasattr(item, "item") else item


def _texts(value: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def sampling_arguments(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments from the request's tensors (absent = default)."""
    if "max_tokens" not in inputs:
        raise ValueError("max_tokens is required")
    max_tokens = int(_scalar(inputs["max_tokens"]))
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    beam = inputs.get("beam_width")
    if beam is not None and int(_scalar(beam)) != 1:
        raise ValueError("beam_width > 1 is not served by this model")
    out: dict[str, Any] = {"max_tokens": max_tokens}
    for name, field in SAMPLING_FIELDS.items():
        if name in inputs:
            out[field] = _scalar(inputs[name])
    for name, field in LIST_FIELDS.items():
        if name in inputs:
            words = [w for w in _texts(inputs[name]) if w]
            if words:
                out[field] = words
    return out


class InflightLimit:
    """At most ``limit`` requests in flight; thread-safe (execute and the event loop share it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count = max(0, self.count - 1)


INPUT_NAMES = ("text_input", "max_tokens", "stream", "exclude_input_in_output")
INPUT_NAMES += tuple(SAMPLING_FIELDS) + tuple(LIST_FIELDS) + ("beam_width",)


def _request_inputs(request: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def _text_response(text: str) -> Any:
    value = np.array([text.encode("utf-8")], dtype=object)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", value)])


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = model_parameters(json.loads(args["model_config"]))
        devices = params.get("gpu_device_ids", "").strip()
        if devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        self._sampling_params = SamplingParams
        config_path = Path(args["model_repository"]) / args["model_version"] / "model.yaml"
        llm_args = llm_arguments(yaml.safe_load(config_path.read_text()))
        if isinstance(llm_args.get("kv_cache_config"), dict):
            llm_args["kv_cache_config"] = KvCacheConfig(**llm_args["kv_cache_config"])
        self.llm = LLM(**llm_args)
        queue = int(params.get("engine_queue_size", "0"))
        self.queue_size = queue
        self.limit = InflightLimit(int(params.get("max_active", "1")) + queue)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                inputs = _request_inputs(request)
                prompt = _texts(inputs["text_input"])[0]
                sampling = self._sampling_params(**sampling_arguments(inputs))
                stream = bool(_scalar(inputs["stream"])) if "stream" in inputs else False
            except Exception as exc:
                sender.send(_error_response(f"bad request: {exc}"), flags=final)
                continue
            if not self.limit.try_acquire():
                sender.send(_error_response(OVERFLOW.format(size=self.queue_size)), flags=final)
                continue
            asyncio.run_coroutine_threadsafe(
                self._generate(sender, prompt, sampling, stream), self.loop
            )
        return None

    async def _generate(self, sender: Any, prompt: str, sampling: Any, stream: bool) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            output = self.llm.generate_async(prompt, sampling_params=sampling, streaming=stream)
            if stream:
                async for step in output:
                    if sender.is_cancelled():
                        output.abort()
                        break
                    delta = step.outputs[0].text_diff
                    if delta:
                        sender.send(_text_response(delta))
                sender.send(flags=final)
            else:
                result = await output.aresult()
                sender.send(_text_response(result.outputs[0].text), flags=final)
        except Exception as exc:
            sender.send(_error_response(f"generation failed: {exc}"), flags=final)
        finally:
            self.limit.release()

    def finalize(self) -> None:
        self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
