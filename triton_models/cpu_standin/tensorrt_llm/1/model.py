"""CPU stand-in for a TensorRT-LLM engine, served by Triton's python backend (decoupled).

Two dialects (``dialect`` parameter, written by ``devstack/triton_launcher.py``):

* ``ensemble``: this is the ``tensorrt_llm`` step of a stock-shaped Triton ensemble. Its inputs
  are the stock ``tensorrt_llm`` model's names for what the stock ensemble maps to it
  (``request_output_len``, ``streaming``, ``runtime_top_k``, ``seed``, ``min_tokens``, ...), with
  ``text_input`` / ``stop_words`` / ``bad_words`` as text where the stock chain tokenizes them in
  its ``preprocessing`` step. It exports TensorRT-LLM's ``nv_trt_llm_*`` / ``nv_llm_*`` families,
  labelled with this model's name, like the C++ backend's ``CustomMetricsReporter``.
* ``llmapi``: NVIDIA's LLM-API python model (``text_input``, ``streaming``,
  ``sampling_param_*``). Like the real one it exports no ``nv_trt_llm_*`` metric.

Inside, a thread imitates TensorRT-LLM's executor:

* ``max_active`` is the executor's cap on active requests (``maxNumActiveRequests``, exported as
  ``request_type="max"``). A request beyond it waits in the executor queue, of at most
  ``engine_queue_size`` requests (queued ones only, as ``enqueueRequests`` counts them); beyond
  that the request fails with the executor's INTERNAL error, ``Maximum queue size of N has been
  reached, please try again later (<file>:<line>)`` and a backtrace (TLLM_THROW's form). No
  metric shows that queue's depth, as on the real thing. With ``engine_queue_full: block`` the
  instance holds instead, so Triton's own queue policy takes the overflow (stand-in only).
* each iteration schedules at most ``max_batch_size`` active requests whose KV blocks fit
  (running ones first, then new ones in arrival order); the rest of the active ones are
  ``waiting`` (= active - scheduled, a subset of active). ``context`` counts the scheduled ones
  in their first (prefill) iteration.
* the KV cache is paged (``kv_cache_blocks`` of ``kv_tokens_per_block`` tokens) and, with
  ``enable_kv_cache_reuse`` (TensorRT-LLM's parameter), keeps the full blocks of ended
  sequences for later prompts that start with the same tokens (``kv_cache.py``: chained block
  hashes, LRU eviction of unheld blocks). The ``kv_cache_block_type`` gauges read it: ``used``
  is the blocks running sequences hold, ``free`` the rest (cached-but-unheld ones included),
  ``reused`` the blocks found cached at admission since start.
* an iteration costs ``decode_ms_per_token * (1 + batch_slowdown * (scheduled - 1)) / speed``
  plus ``prefill_ms_per_token * uncached prompt tokens of the context requests / speed``.
* the gauges are refreshed after every iteration; the iteration that empties the executor is
  reported too, so they read 0 when idle (``executionLoop`` does the same).
* before every iteration it asks Triton whether each request it holds (active or queued) was
  cancelled, and drops a cancelled one with a flag-only final response (the backend's
  ``WaitForCancel`` + the executor's ``cancelRequest``).

Tokens are words and punctuation (``\\w+|[^\\w\\s]``); the text is deterministic per prompt and
seed. All knobs are ``parameters`` in ``config.pbtxt``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from kv_cache import Holding, PagedKVCache, block_hashes

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all we their has "
    "would when if so no will more can said who about what some out up them into "
    "time only new other model token fleet replica queue batch engine route serve "
    "load "
).split()

# the stand-in's stand-in for TLLM_THROW's __FILE__:__LINE__ and backtrace
THROW_SITE = "/src/tensorrt_llm/cpp/tensorrt_llm/executor/executorImpl.cpp:744"
BACKTRACE = (
    "tensorrt_llm::executor::Executor::Impl::enqueueRequests(tensorrt_llm::common::ArrayView"
    "<tensorrt_llm::executor::Request const> const&)",
    "tensorrt_llm::executor::Executor::enqueueRequests(std::vector<tensorrt_llm::executor::"
    "Request, std::allocator<tensorrt_llm::executor::Request> > const&)",
    "triton::backend::inflight_batcher_llm::ModelInstanceState::enqueue(TRITONBACKEND_Request**,"
    " unsigned int)",
    "TRITONBACKEND_ModelInstanceExecute",
)

# input names per dialect: (prompt, max tokens, stream, seed, stop words); the ensemble's
# preprocessing step turns text into token ids (input_ids) and passes stop words as text
INPUTS = {
    "ensemble": ("input_ids", "request_output_len", "streaming", "seed", "stop_words"),
    "llmapi": (
        "text_input",
        "sampling_param_max_tokens",
        "streaming",
        "sampling_param_seed",
        "sampling_param_stop",
    ),
}
HISTOGRAM_BUCKETS = [10.0, 50.0, 100.0, 500.0, 1000.0]
KV_BYTES_PER_TOKEN = 131072  # fp16 K+V of an 8B Llama (32 layers x 8 KV heads x 128 x 2 x 2 B)


def queue_full_message(size: int) -> str:
    """TensorRT-LLM's TllmException text for a full executor queue: message (file:line) + trace."""
    frames = [
        f"{i:<3d} {hex(random.randrange(0x7F0000000000, 0x7FFFFFFFFFFF)):>18} {name} + "
        f"{random.randrange(64, 4096)}"
        for i, name in enumerate(BACKTRACE, start=1)
    ]
    return (
        f"Maximum queue size of {size} has been reached, please try again later "
        f"({THROW_SITE})\n" + "\n".join(frames)
    )


def token_id(word: str) -> int:
    """A token's id: the ``preprocessing`` step's (CRC32 of the token, 31 bits)."""
    return zlib.crc32(word.encode()) & 0x7FFFFFFF


@dataclass(eq=False)  # identity: sequences are removed from lists by identity
class Sequence:
    sender: Any
    prompt_ids: list[int]
    prompt_hashes: list[bytes]  # the chained hashes of its prompt's full KV blocks
    max_tokens: int
    stream: bool
    stop_words: list[str]
    rng: np.random.Generator
    generated: list[str] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    holding: Holding | None = None  # its KV blocks, from its context iteration on
    cached_tokens: int = 0  # prompt tokens found in the KV cache (not prefilled)
    perf_metrics: bool = False  # return_perf_metrics: its responses carry the kv_cache_* outputs
    reused_blocks: int = 0  # prompt blocks found cached at admission
    allocated_blocks: int = 0  # blocks it took at admission

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated_ids)

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
        self.dialect = _param(config, "dialect", "ensemble")
        self.speed = float(_param(config, "speed", "1.0"))
        self.max_active = int(_param(config, "max_active", "4"))
        self.max_batch_size = int(_param(config, "max_batch_size", str(self.max_active)))
        self.engine_queue_size = int(_param(config, "engine_queue_size", "8"))
        self.engine_queue_full = _param(config, "engine_queue_full", "reject")
        self.prefill_s = float(_param(config, "prefill_ms_per_token", "0.2")) / 1000.0
        self.decode_s = float(_param(config, "decode_ms_per_token", "20")) / 1000.0
        self.batch_slowdown = float(_param(config, "batch_slowdown", "0.05"))
        self.kv_blocks = int(_param(config, "kv_cache_blocks", "512"))
        self.tokens_per_block = int(_param(config, "kv_tokens_per_block", "64"))
        reuse = _param(config, "enable_kv_cache_reuse", "false").lower()
        if (
            self.speed <= 0
            or self.max_active < 1
            or self.max_batch_size < 1
            or self.engine_queue_size < 0
            or self.kv_blocks < 1
            or self.tokens_per_block < 1
        ):
            raise pb_utils.TritonModelException(
                f"bad stand-in parameters: speed={self.speed} max_active={self.max_active} "
                f"max_batch_size={self.max_batch_size} engine_queue_size={self.engine_queue_size}"
                f" kv_cache_blocks={self.kv_blocks} kv_tokens_per_block={self.tokens_per_block}"
            )
        if reuse not in ("true", "false"):
            raise pb_utils.TritonModelException(
                f"enable_kv_cache_reuse must be true or false, not {reuse!r}"
            )
        self.kv = PagedKVCache(self.kv_blocks, self.tokens_per_block, reuse=reuse == "true")
        if self.engine_queue_full not in ("reject", "block"):
            raise pb_utils.TritonModelException(
                f"engine_queue_full must be reject or block, not {self.engine_queue_full!r}"
            )
        if self.dialect not in INPUTS:
            raise pb_utils.TritonModelException(f"dialect must be one of {sorted(INPUTS)}")
        self.names = INPUTS[self.dialect]

        self.cond = threading.Condition()
        self.queued: deque[Sequence] = deque()  # the executor queue: in no metric
        self.active: list[Sequence] = []
        self.stopping = False
        self.iterations = 0
        self.last_batch: list[Sequence] = []
        self.last_context: list[Sequence] = []
        self.metrics = self.dialect == "ensemble"
        if self.metrics:
            self._init_metrics()
        # stand-in only, for tests (no real replica has it; the sidecar must not read it):
        # requests dropped because Triton cancelled them, from the batch or the queue
        self.cancelled_family = pb_utils.MetricFamily(
            name="triage_request_cancelled",
            description="stand-in only: requests dropped because Triton cancelled them",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.cancellations = self.cancelled_family.Metric(
            labels={"model": self.model_name, "version": str(self.model_version)}
        )
        self.worker = threading.Thread(target=self._run, name="standin-executor", daemon=True)
        self.worker.start()

    # ---- metrics (custom_metrics_reporter.cc's families, labels and values) ---------------
    def _group(self, name: str, description: str, kind: Any, label: str, values: list[str]):
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.families.append(family)  # a family must outlive its metrics
        labels = {"model": self.model_name, "version": str(self.model_version)}
        if kind == pb_utils.MetricFamily.HISTOGRAM:
            return {
                v: family.Metric(labels={**labels, label: v}, buckets=HISTOGRAM_BUCKETS)
                for v in values
            }
        return {v: family.Metric(labels={**labels, label: v}) for v in values}

    def _init_metrics(self) -> None:
        self.families: list[Any] = []
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self.m_request = self._group(
            "nv_trt_llm_request_metrics",
            "TRT LLM request metrics",
            gauge,
            "request_type",
            ["active", "max", "scheduled", "context", "waiting"],
        )
        self.m_memory = self._group(
            "nv_trt_llm_runtime_memory_metrics",
            "TRT LLM runtime memory metrics",
            gauge,
            "memory_type",
            ["cpu", "gpu", "pinned"],
        )
        self.m_kv = self._group(
            "nv_trt_llm_kv_cache_block_metrics",
            "TRT LLM KV cache block metrics",
            gauge,
            "kv_cache_block_type",
            ["max", "free", "used", "tokens_per", "reused", "fraction"],
        )
        self.m_disagg = self._group(
            "nv_trt_llm_disaggregated_serving_metrics",
            "TRT LLM disaggregated serving metrics",
            counter,
            "disaggregated_serving_type",
            ["kv_cache_transfer_ms", "request_count"],
        )
        self.m_ifb = self._group(
            "nv_trt_llm_inflight_batcher_metrics",
            "TRT LLM inflight_batcher-specific metrics",
            gauge,
            "inflight_batcher_specific_metric",
            ["total_context_tokens", "generation_requests", "micro_batch_id", "paused_requests"],
        )
        self.m_general = self._group(
            "nv_trt_llm_general_metrics",
            "General TRT LLM metrics",
            gauge,
            "general_type",
            ["timestamp", "iteration_counter"],
        )
        self.m_output_len = self._group(
            "nv_llm_output_token_len",
            "TRT LLM response metrics",
            histogram,
            "response_metric_type",
            ["total_output_tokens"],
        )
        self.m_input_len = self._group(
            "nv_llm_input_token_len",
            "TRT LLM response metrics",
            histogram,
            "response_metric_type",
            ["total_input_tokens"],
        )
        # plausible constants: the KV pool on the GPU, host-side buffers, pinned staging
        kv_bytes = self.kv_blocks * self.tokens_per_block * KV_BYTES_PER_TOKEN
        self.memory = {"cpu": 412 * 2**20, "gpu": kv_bytes + 1536 * 2**20, "pinned": 64 * 2**20}
        self._report(scheduled=[], context=[])

    def _report(self, scheduled: list[Sequence], context: list[Sequence]) -> None:
        """One iteration's stats, as WaitForStats turns IterationStats into the gauges."""
        if not self.metrics:
            return
        active = len(self.active)
        used = self.kv.used
        request = {
            "active": active,
            "max": self.max_active,
            "scheduled": len(scheduled),
            "context": len(context),
            "waiting": active - len(scheduled),
        }
        for key, value in request.items():
            self.m_request[key].set(value)
        for key, value in self.memory.items():
            self.m_memory[key].set(value)
        kv = {
            "max": self.kv_blocks,
            "free": self.kv.free,
            "used": used,
            "tokens_per": self.tokens_per_block,
            "reused": self.kv.reused_blocks,
            "fraction": used / self.kv_blocks,
        }
        for key, value in kv.items():
            self.m_kv[key].set(value)
        ifb = {
            "total_context_tokens": sum(s.prompt_tokens - s.cached_tokens for s in context),
            "generation_requests": len(scheduled) - len(context),
            "micro_batch_id": 0,
            "paused_requests": 0,
        }
        for key, value in ifb.items():
            self.m_ifb[key].set(value)
        self.m_general["timestamp"].set(float(int(time.time() * 1e6)))
        self.m_general["iteration_counter"].set(self.iterations)

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
                    queue_full_message(self.engine_queue_size),
                    pb_utils.TritonError.INTERNAL,
                )
        return None

    def _parse(self, request: Any, sender: Any) -> Sequence:
        prompt_name, max_name, stream_name, seed_name, stop_name = self.names
        tensor = pb_utils.get_input_tensor_by_name(request, prompt_name)
        if tensor is None:
            raise ValueError(f"{prompt_name} is required")
        if self.dialect == "ensemble":
            ids = tensor.as_numpy().reshape(-1).astype(np.int32)
            prompt_bytes, prompt_ids = ids.tobytes(), [int(i) for i in ids]
        else:
            text = tensor.as_numpy().reshape(-1)[0]
            prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            prompt_bytes = prompt.encode()
            prompt_ids = [token_id(word) for word in TOKEN_RE.findall(prompt)]
        max_tokens_raw = _scalar(request, max_name)
        max_tokens = int(max_tokens_raw) if max_tokens_raw is not None else 16
        if max_tokens < 1:
            raise ValueError(f"{max_name} must be >= 1, got {max_tokens}")
        stream = bool(_scalar(request, stream_name) or False)
        perf = self.dialect == "ensemble" and bool(_scalar(request, "return_perf_metrics"))
        seed = _scalar(request, seed_name)
        digest = hashlib.sha256(prompt_bytes).digest()
        base = int.from_bytes(digest[:8], "little")
        rng = np.random.default_rng(base ^ int(seed) if seed is not None else base)
        return Sequence(
            sender=sender,
            prompt_ids=prompt_ids or [0],
            prompt_hashes=block_hashes(prompt_ids or [0], self.tokens_per_block),
            max_tokens=max_tokens,
            stream=stream,
            stop_words=_strings(request, stop_name),
            rng=rng,
            perf_metrics=perf,
        )

    def _full(self) -> bool:
        """The executor's check counts queued requests only (not active ones): requests that
        arrived since the last iteration fetched the queue. ``engine_queue_size: 0`` is the
        stand-in's "no queue behind ``max_active``" (the real one reads <= 0 as unbounded)."""
        if self.engine_queue_size == 0:
            return len(self.active) + len(self.queued) >= self.max_active
        return len(self.queued) >= self.engine_queue_size

    def _enqueue(self, seq: Sequence) -> None:
        with self.cond:
            if self.engine_queue_full == "block":
                while self._full() and not self.stopping:
                    self.cond.wait(0.05)
            elif self._full():
                raise EngineFull
            self.queued.append(seq)
            self.cond.notify_all()

    @staticmethod
    def _fail(sender: Any, message: str, code: Any) -> None:
        error = pb_utils.TritonError(message, code)
        try:
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[], error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception as exc:  # the client went away (a cancelled request, at shutdown)
            pb_utils.Logger.log_warn(f"stand-in: could not send an error ({message}): {exc}")

    # ---- executor loop ----------------------------------------------------------------------
    def _schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """This iteration's batch: running sequences first (they keep their blocks), then
        sequences not started yet whose prompt fits in the free blocks (its cached prefix
        reused); at most ``max_batch_size``. Called with ``self.cond`` held."""
        batch: list[Sequence] = []
        context: list[Sequence] = []
        for seq in self.active:
            if len(batch) >= self.max_batch_size:
                break
            if seq.holding is not None:
                if not self.kv.grow(seq.holding, seq.tokens):
                    continue  # no room for its next token: it waits (no preemption)
                batch.append(seq)
        for seq in self.active:
            if len(batch) >= self.max_batch_size:
                break
            if seq.holding is None:
                admitted = self.kv.admit(seq.prompt_hashes, seq.prompt_tokens)
                if admitted is None:
                    break  # first come, first served: later ones do not overtake it
                seq.holding, seq.cached_tokens = admitted
                seq.reused_blocks, seq.allocated_blocks = seq.holding.covered, seq.holding.own
                batch.append(seq)
                context.append(seq)
        return batch, context

    def _release(self, seq: Sequence) -> None:
        """Its blocks back to the cache (its full blocks stay cached). ``self.cond`` held."""
        if seq.holding is not None:
            ids = seq.prompt_ids + seq.generated_ids
            self.kv.release(seq.holding, block_hashes(ids, self.tokens_per_block))
            seq.holding = None

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.active and not self.queued:
                    self.cond.wait()
                if self.stopping:
                    return
                held = list(self.active) + list(self.queued)
            step_start = time.monotonic()
            # the backend's WaitForCancel + executor cancelRequest: drop what Triton cancelled
            # before it takes a slot or a step (each probe is an IPC round trip, ~50 µs)
            self._drop_cancelled([seq for seq in held if seq.cancelled()])
            with self.cond:
                while self.queued and len(self.active) < self.max_active:
                    seq = self.queued.popleft()
                    seq.admitted_at = time.monotonic()
                    self.active.append(seq)
                batch, context = self._schedule()
                self.last_batch, self.last_context = batch, context
                self.iterations += 1
                self._report(batch, context)
                self.cond.notify_all()
            if not batch:
                if not self.active:
                    continue
                time.sleep(self.decode_s / self.speed)  # nothing fits: wait an iteration
                continue

            prefill = sum(s.prompt_tokens - s.cached_tokens for s in context) * self.prefill_s
            decode = self.decode_s * (1.0 + self.batch_slowdown * (len(batch) - 1))
            time.sleep(max(0.0, step_start + (prefill + decode) / self.speed - time.monotonic()))

            finished = [seq for seq in batch if self._step(seq)]
            if context:
                with self.cond:  # the prompts just computed are reusable from now on
                    for seq in context:
                        if seq.holding is not None and seq not in finished:
                            self.kv.store(seq.holding, seq.prompt_hashes)
            if finished:
                with self.cond:
                    for seq in finished:
                        self.active.remove(seq)
                        self._release(seq)
                    if not self.active and not self.queued:
                        # executionLoop reports the iteration that empties the executor
                        self.iterations += 1
                        self._report([], [])
                    self.cond.notify_all()
                if self.metrics:
                    for seq in finished:
                        self.m_output_len["total_output_tokens"].observe(len(seq.generated))
                        self.m_input_len["total_input_tokens"].observe(seq.prompt_tokens)

    def _drop_cancelled(self, cancelled: list[Sequence]) -> None:
        """Free the slots and queue places of cancelled sequences and end their responses."""
        if not cancelled:
            return
        dropped: list[Sequence] = []
        with self.cond:
            for seq in cancelled:
                if seq in self.active:
                    self.active.remove(seq)
                    self._release(seq)
                elif seq in self.queued:
                    self.queued.remove(seq)
                else:
                    continue  # finalize() took it meanwhile and answered it
                dropped.append(seq)
            if dropped:  # the last iteration's batch, less what was dropped
                batch = [s for s in self.last_batch if s in self.active]
                context = [s for s in self.last_context if s in self.active]
                self._report(batch, context)
                self.cond.notify_all()
        for seq in dropped:
            self.cancellations.increment(1)
            where = "batch" if seq.admitted_at else "executor queue"
            pb_utils.Logger.log_info(
                f"stand-in {self.model_name}: request cancelled after "
                f"{len(seq.generated)}/{seq.max_tokens} tokens, dropped from the {where}"
            )
            if self.dialect == "llmapi":
                # the LLM-API model's cancellation_loop answers with this error
                self._fail(
                    seq.sender, "Request cancelled by client", pb_utils.TritonError.CANCELLED
                )
            else:
                # the python backend needs the final flag even for a cancelled request
                self._send_final(seq)

    def _step(self, seq: Sequence) -> bool:
        """Emit one token for ``seq``; True when it is done (length or stop word)."""
        word = VOCAB[int(seq.rng.integers(len(VOCAB)))]
        piece = word if not seq.generated else " " + word
        seq.generated.append(piece)
        seq.generated_ids.append(token_id(word))
        text = "".join(seq.generated)
        done = len(seq.generated) >= seq.max_tokens or any(w in text for w in seq.stop_words)
        if seq.stream:
            # the ensemble's postprocessing-less engine streams each step's text; NVIDIA's
            # LLM-API model sends CompletionOutput.text, the whole text so far, every time
            self._send(seq, text if self.dialect == "llmapi" else piece, final=done)
        elif done:
            self._send(seq, text, final=True)
        return done

    @staticmethod
    def _send(seq: Sequence, text: str, final: bool) -> None:
        out = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
        if seq.perf_metrics:
            # the backend's per-request KV-cache stats (return_perf_metrics): the prompt blocks
            # at admission, reused from the cache or newly taken (no block is "new" vs
            # "recycled" here: both counts are the blocks taken)
            for name, value in (
                ("kv_cache_reused_blocks", seq.reused_blocks),
                ("kv_cache_alloc_total_blocks", seq.allocated_blocks),
                ("kv_cache_alloc_new_blocks", seq.allocated_blocks),
            ):
                out.append(pb_utils.Tensor(name, np.array([[value]], dtype=np.int32)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            seq.sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=flags)
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
            pending = list(self.queued) + list(self.active)
            self.queued.clear()
            self.active.clear()
            self.cond.notify_all()
        for seq in pending:
            self._fail(seq.sender, "model is unloading", pb_utils.TritonError.UNAVAILABLE)
        self.worker.join(timeout=5)
