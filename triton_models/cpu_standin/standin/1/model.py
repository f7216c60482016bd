"""CPU stand-in for a TensorRT-LLM replica, served by Triton's python backend.

On the wire it looks like the TensorRT-LLM ``ensemble``: inputs ``text_input``, ``max_tokens``,
``stream`` (plus the usual sampling inputs, accepted), output ``text_output``; decoupled, so it
answers ``/generate`` with one response and ``/generate_stream`` with one SSE event per token.

Inside, a scheduler thread imitates TensorRT-LLM's in-flight batcher:

* at most ``max_active`` sequences run at once; the rest wait in an engine queue of
  ``engine_queue_size``; beyond that the request fails like the TensorRT-LLM executor does
  (HTTP 500 "Maximum queue size of N has been reached, please try again later"), or, with
  ``engine_queue_full: block``, the model instance holds so Triton's own queue policy
  (``max_queue_size``, REJECT → HTTP 503) takes the overflow;
* each engine step costs ``decode_ms_per_token * (1 + batch_slowdown * (active - 1)) / speed``
  plus, for sequences admitted in that step, ``prefill_ms_per_token * prompt_tokens / speed``;
* it publishes TensorRT-LLM's metric names (``nv_trt_llm_request_metrics``,
  ``nv_trt_llm_kv_cache_block_metrics``) through the python backend's custom-metrics API;
* before every step it asks Triton whether each sequence (running or still in the engine queue)
  was cancelled, and drops a cancelled one at once with a flag-only final response, as
  TensorRT-LLM's backend does with ``TRITONBACKEND_ResponseFactoryIsCancelled`` and the
  executor's ``cancelRequest``: its batch slot (or queue place) is free for that very step.

Tokens are words and punctuation (see ``count_tokens``); the text generated is deterministic
for a given prompt and seed. All knobs are ``parameters`` in ``config.pbtxt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all we their has "
    "would when if so no will more can said who about what some out up them into "
    "time only new other model token fleet replica queue batch engine route serve "
    "load "
).split()


def count_tokens(text: str) -> int:
    """The stand-in's tokenizer: words and punctuation marks (the gateway uses the same rule)."""
    return len(TOKEN_RE.findall(text))


@dataclass(eq=False)  # identity: sequences are removed from lists by identity
class Sequence:
    sender: Any
    request: Any
    prompt_tokens: int
    max_tokens: int
    stream: bool
    stop_words: list[str]
    rng: np.random.Generator
    generated: list[str] = field(default_factory=list)
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0

    def cancelled(self) -> bool:
        """Whether Triton cancelled the request (one IPC round trip to the backend)."""
        try:
            return bool(self.sender.is_cancelled())
        except Exception as exc:  # the engine thread must survive; the next step asks again
            pb_utils.Logger.log_warn(
                f"stand-in: could not ask whether a request was cancelled "
                f"({len(self.generated)}/{self.max_tokens} tokens): {exc}"
            )
            return False

    def kv_tokens(self) -> int:
        return self.prompt_tokens + len(self.generated)


class EngineFull(Exception):
    pass


def _param(config: dict[str, Any], key: str, default: str) -> str:
    entry = config.get("parameters", {}).get(key)
    return entry["string_value"] if entry and entry.get("string_value", "") != "" else default


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    return values[0] if values.size else None


def _strings(request: Any, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    out = []
    for value in tensor.as_numpy().reshape(-1):
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if text:
            out.append(text)
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.model_version = args.get("model_version", "1")
        self.speed = float(_param(config, "speed", "1.0"))
        self.max_active = int(_param(config, "max_active", "4"))
        self.engine_queue_size = int(_param(config, "engine_queue_size", "8"))
        self.engine_queue_full = _param(config, "engine_queue_full", "reject")
        self.prefill_s = float(_param(config, "prefill_ms_per_token", "0.2")) / 1000.0
        self.decode_s = float(_param(config, "decode_ms_per_token", "20")) / 1000.0
        self.batch_slowdown = float(_param(config, "batch_slowdown", "0.05"))
        self.kv_blocks = int(_param(config, "kv_cache_blocks", "512"))
        self.tokens_per_block = int(_param(config, "kv_tokens_per_block", "64"))
        if self.speed <= 0 or self.max_active < 1 or self.engine_queue_size < 0:
            raise pb_utils.TritonModelException(
                f"bad stand-in parameters: speed={self.speed} max_active={self.max_active} "
                f"engine_queue_size={self.engine_queue_size}"
            )
        if self.engine_queue_full not in ("reject", "block"):
            raise pb_utils.TritonModelException(
                f"engine_queue_full must be reject or block, not {self.engine_queue_full!r}"
            )

        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.context_last_step = 0
        self.stopping = False
        self._init_metrics()
        self.worker = threading.Thread(target=self._run, name="standin-engine", daemon=True)
        self.worker.start()

    # ---- metrics -------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        labels = {"model": self.model_name, "version": str(self.model_version)}
        self.request_family = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="TRT LLM request metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.kv_family = pb_utils.MetricFamily(
            name="nv_trt_llm_kv_cache_block_metrics",
            description="TRT LLM KV cache block metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.request_metrics = {
            kind: self.request_family.Metric(labels={**labels, "request_type": kind})
            for kind in ("active", "max", "scheduled", "context", "waiting")
        }
        self.kv_metrics = {
            kind: self.kv_family.Metric(labels={**labels, "kv_cache_block_type": kind})
            for kind in ("max", "free", "used", "tokens_per", "fraction")
        }
        # Triton's own nv_inference_request_duration_us stops at execute() return for a
        # decoupled python model, so the stand-in also counts completions itself. Service time
        # starts at admission to the batch: queueing is already counted by the router as load.
        self.duration_family = pb_utils.MetricFamily(
            name="triage_request_duration_us",
            description="Cumulative service time (engine admission to final response), µs",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.success_family = pb_utils.MetricFamily(
            name="triage_request_success",
            description="Requests that ended with a final response and no error",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.cancelled_family = pb_utils.MetricFamily(
            name="triage_request_cancelled",
            description="Requests dropped because Triton cancelled them (client gone), "
            "from the batch or from the engine queue",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # TensorRT-LLM's executor iteration counter: the sidecar's size-independent speed signal
        # (busy time per iteration = time per generated token of each sequence in the batch)
        self.general_family = pb_utils.MetricFamily(
            name="nv_trt_llm_general_metrics",
            description="General TRT LLM metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.iteration_counter = self.general_family.Metric(
            labels={**labels, "general_type": "iteration_counter"}
        )
        self.iteration_timestamp = self.general_family.Metric(
            labels={**labels, "general_type": "timestamp"}
        )
        self.iterations = 0
        self.duration_us = self.duration_family.Metric(labels=labels)
        self.success = self.success_family.Metric(labels=labels)
        self.cancellations = self.cancelled_family.Metric(labels=labels)
        self.request_metrics["max"].set(self.max_active)
        self.kv_metrics["max"].set(self.kv_blocks)
        self.kv_metrics["tokens_per"].set(self.tokens_per_block)
        self._publish_metrics()

    def _publish_metrics(self) -> None:
        """Called with ``self.cond`` held (or before the worker starts)."""
        used = sum(math.ceil(s.kv_tokens() / self.tokens_per_block) for s in self.active)
        used = min(used, self.kv_blocks)
        self.request_metrics["active"].set(len(self.active))
        self.request_metrics["scheduled"].set(len(self.active))
        self.request_metrics["context"].set(self.context_last_step)
        self.request_metrics["waiting"].set(len(self.waiting))
        self.kv_metrics["used"].set(used)
        self.kv_metrics["free"].set(self.kv_blocks - used)
        self.kv_metrics["fraction"].set(used / self.kv_blocks if self.kv_blocks else 0.0)

    # ---- request intake -----------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                seq = self._parse(request, sender)
            except ValueError as exc:
                self._fail(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            try:
                self._enqueue(seq)
            except EngineFull:
                self._fail(
                    sender,
                    f"Maximum queue size of {self.engine_queue_size} has been reached, "
                    "please try again later",
                    pb_utils.TritonError.INTERNAL,
                )
        return None

    def _parse(self, request: Any, sender: Any) -> Sequence:
        text = _scalar(request, "text_input")
        if text is None:
            raise ValueError("text_input is required")
        prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        max_tokens_raw = _scalar(request, "max_tokens")
        max_tokens = int(max_tokens_raw) if max_tokens_raw is not None else 16
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stream = bool(_scalar(request, "stream") or False)
        seed = _scalar(request, "random_seed")
        if seed is None:
            seed = _scalar(request, "seed")
        digest = hashlib.sha256(prompt.encode()).digest()
        base = int.from_bytes(digest[:8], "little")
        rng = np.random.default_rng(base ^ int(seed) if seed is not None else base)
        return Sequence(
            sender=sender,
            request=request,
            prompt_tokens=max(1, count_tokens(prompt)),
            max_tokens=max_tokens,
            stream=stream,
            stop_words=_strings(request, "stop_words"),
            rng=rng,
        )

    def _enqueue(self, seq: Sequence) -> None:
        with self.cond:
            if self.engine_queue_full == "block":
                while (
                    len(self.waiting) >= self.engine_queue_size
                    and len(self.active) >= self.max_active
                    and not self.stopping
                ):
                    self.cond.wait(0.05)
            elif (
                len(self.waiting) >= self.engine_queue_size and len(self.active) >= self.max_active
            ):
                raise EngineFull
            self.waiting.append(seq)
            self._publish_metrics()
            self.cond.notify_all()

    @staticmethod
    def _fail(sender: Any, message: str, code: Any) -> None:
        error = pb_utils.TritonError(message, code)
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[], error=error),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    # ---- engine loop ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.active and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    return
                candidates = list(self.active) + list(self.waiting)
            step_start = time.monotonic()
            # between steps: drop what Triton cancelled, before it takes a slot or a step (each
            # probe is an IPC round trip, ~50 µs; the step's modelled cost includes them)
            self._drop_cancelled([seq for seq in candidates if seq.cancelled()])
            with self.cond:
                admitted: list[Sequence] = []
                while self.waiting and len(self.active) < self.max_active:
                    seq = self.waiting.popleft()
                    seq.admitted_at = time.monotonic()
                    self.active.append(seq)
                    admitted.append(seq)
                self.context_last_step = len(admitted)
                batch = list(self.active)
                self._publish_metrics()
                self.cond.notify_all()
            if not batch:
                continue

            prefill = sum(s.prompt_tokens for s in admitted) * self.prefill_s
            decode = self.decode_s * (1.0 + self.batch_slowdown * (len(batch) - 1))
            time.sleep(max(0.0, step_start + (prefill + decode) / self.speed - time.monotonic()))

            finished = [seq for seq in batch if self._step(seq)]
            self.iterations += 1
            self.iteration_counter.set(self.iterations)
            self.iteration_timestamp.set(time.time() * 1e6)
            now = time.monotonic()
            for seq in finished:
                self.duration_us.increment((now - seq.admitted_at) * 1e6)
                self.success.increment(1)
            with self.cond:
                for seq in finished:
                    self.active.remove(seq)
                self._publish_metrics()
                self.cond.notify_all()

    def _drop_cancelled(self, cancelled: list[Sequence]) -> None:
        """Free the slots and queue places of cancelled sequences and end their responses."""
        if not cancelled:
            return
        dropped: list[Sequence] = []
        with self.cond:
            for seq in cancelled:
                if seq in self.active:
                    self.active.remove(seq)
                elif seq in self.waiting:
                    self.waiting.remove(seq)
                else:
                    continue  # finalize() took it meanwhile and answered it
                dropped.append(seq)
            if dropped:
                self._publish_metrics()
                self.cond.notify_all()
        for seq in dropped:
            self.cancellations.increment(1)
            where = "batch" if seq.admitted_at else "engine queue"
            pb_utils.Logger.log_info(
                f"stand-in {self.model_name}: request cancelled after "
                f"{len(seq.generated)}/{seq.max_tokens} tokens, dropped from the {where}"
            )
            # the python backend needs the final flag even for a cancelled request
            self._send_final(seq)

    def _step(self, seq: Sequence) -> bool:
        """Emit one token for ``seq``; True when it is done (length or stop word)."""
        word = VOCAB[int(seq.rng.integers(len(VOCAB)))]
        piece = word if not seq.generated else " " + word
        seq.generated.append(piece)
        text = "".join(seq.generated)
        done = len(seq.generated) >= seq.max_tokens or any(w in text for w in seq.stop_words)
        if seq.stream:
            self._send(seq, piece, final=done)
        elif done:
            self._send(seq, text, final=True)
        return done

    @staticmethod
    def _send(seq: Sequence, text: str, final: bool) -> None:
        out = pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            seq.sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=flags)
        except Exception as exc:  # the client went away between steps
            pb_utils.Logger.log_warn(f"stand-in: could not send a response: {exc}")

    @staticmethod
    def _send_final(seq: Sequence) -> None:
        try:
            seq.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # pb_utils raises its own TritonModelException
            pb_utils.Logger.log_warn(
                f"stand-in: could not end a cancelled request ({len(seq.generated)} tokens "
                f"sent): {exc}"
            )

    def finalize(self) -> None:
        with self.cond:
            self.stopping = True
            pending = list(self.waiting) + list(self.active)
            self.waiting.clear()
            self.active.clear()
            self.cond.notify_all()
        for seq in pending:
            self._fail(seq.sender, "model is unloading", pb_utils.TritonError.UNAVAILABLE)
        self.worker.join(timeout=5)
