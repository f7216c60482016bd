"""Validate a build before any GPU work: parallelism vs the model's heads, GPUs, memory.

``make_plan`` is pure: settings, the checkpoint's shape and the GPUs (None: nvidia-smi absent)
in, a ``Plan`` out, or a ``PlanError`` listing every problem with the field and the numbers.

Memory per GPU (MiB, the worst pipeline stage) is estimated as

* weights: ceil(layers / pp) × (attention + gated MLP) / tp × bytes per GEMM weight (dtype, or 1
  for int8 weight-only, 0.5 for int4), plus the embedding (replicated) and the LM head (split by
  tp) in the model dtype;
* KV cache: 2 × ceil(layers / pp) × (kv_heads / tp) × head_dim × max_batch_size × max_seq_len
  × dtype bytes (every sequence at full length, what ``guaranteed_no_evict`` must be able to hold);
* activations: max_num_tokens × (2·hidden + (heads + 2·kv_heads)·head_dim / tp
  + 2·intermediate / tp) × dtype bytes, plus FP32 logits of max_batch_size × vocab / tp;
* runtime: ``runtime_overhead_mb`` (CUDA context, cuBLAS / NCCL workspaces, decoder buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from build_engines.gpus import GpuInfo
from build_engines.model_shape import ModelShape
from build_engines.settings import BuildSettings

MIB = 1 << 20
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
GEMM_BYTES = {"int8_wo": 1.0, "int4_wo": 0.5}
CHECKPOINT_GEMM_BYTES = {"fp8": 1.0}  # pre-quantised checkpoints served by the LLM API


@dataclass(frozen=True)
class MemoryEstimate:
    weights_mb: float
    kv_cache_mb: float
    activations_mb: float
    runtime_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.kv_cache_mb + self.activations_mb + self.runtime_mb


@dataclass(frozen=True)
class Devices:
    count: int | None
    memory_mb: int | None
    source: str
    """``nvidia-smi`` or ``settings``"""
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanProblem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class PlanError(ValueError):
    def __init__(self, problems: list[PlanProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class Plan:
    settings: BuildSettings
    shape: ModelShape
    devices: Devices
    memory: MemoryEstimate

    def describe(self) -> list[str]:
        s, m, shape = self.settings, self.memory, self.shape
        return [
            f"model      {s.model_path} ({shape.model_type}, {shape.parameter_count() / 1e9:.2f} B"
            f" parameters, {shape.num_hidden_layers} layers, {shape.num_attention_heads} heads, "
            f"{shape.num_key_value_heads} KV heads)",
            f"serving    {s.serving}  dtype {s.dtype}  quantization {s.quantization}",
            f"parallel   tp_size={s.tp_size} pp_size={s.pp_size} -> {s.world_size} GPU(s) "
            f"{s.device_ids}",
            f"limits     max_batch_size={s.max_batch_size} max_input_len={s.max_input_len} "
            f"max_seq_len={s.max_seq_len} max_num_tokens={s.max_num_tokens}",
            f"memory/GPU {m.total_mb:,.0f} MiB = weights {m.weights_mb:,.0f} + KV cache "
            f"{m.kv_cache_mb:,.0f} + activations {m.activations_mb:,.0f} + runtime "
            f"{m.runtime_mb:,.0f} (device {_fmt(self.devices.memory_mb)} MiB, "
            f"{self.devices.source})",
        ]


def _fmt(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def estimate_memory(settings: BuildSettings, shape: ModelShape) -> MemoryEstimate:
    tp, pp = settings.tp_size, settings.pp_size
    dtype_bytes = DTYPE_BYTES[settings.dtype]
    gemm_bytes = GEMM_BYTES.get(settings.quantization, float(dtype_bytes))
    if shape.checkpoint_quantization in CHECKPOINT_GEMM_BYTES and settings.serving == "llmapi":
        gemm_bytes = CHECKPOINT_GEMM_BYTES[shape.checkpoint_quantization]
    layers = math.ceil(shape.num_hidden_layers / pp)
    attention, mlp = shape.layer_params()
    stage = layers * ((attention + mlp) / tp * gemm_bytes + 2 * shape.hidden_size * dtype_bytes)
    embedding = shape.vocab_size * shape.hidden_size * dtype_bytes
    lm_head = embedding / tp
    first, last = stage + embedding, stage + lm_head
    weights = first + lm_head if pp == 1 else max(first, last)

    kv_heads = shape.num_key_value_heads / tp
    kv = 2 * layers * kv_heads * shape.head_dim * settings.max_batch_size * settings.max_seq_len
    kv *= dtype_bytes

    per_token = (
        2 * shape.hidden_size
        + (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim / tp
        + 2 * shape.intermediate_size / tp
    )
    activations = settings.max_num_tokens * per_token * dtype_bytes
    activations += settings.max_batch_size * shape.vocab_size / tp * 4
    return MemoryEstimate(
        weights_mb=weights / MIB,
        kv_cache_mb=kv / MIB,
        activations_mb=activations / MIB,
        runtime_mb=float(settings.runtime_overhead_mb),
    )


def resolve_devices(settings: BuildSettings, gpus: list[GpuInfo] | None) -> Devices:
    """nvidia-smi when present (the memory of the smallest GPU this replica uses); else settings."""
    if gpus:
        chosen = [g for g in gpus if g.index in settings.device_ids] or gpus
        return Devices(
            count=len(gpus),
            memory_mb=min(g.memory_mb for g in chosen),
            source="nvidia-smi",
            names=tuple(sorted({g.name for g in chosen})),
        )
    return Devices(count=settings.gpu_count, memory_mb=settings.device_memory_mb, source="settings")


def _parallel_problems(settings: BuildSettings, shape: ModelShape) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    tp, pp = settings.tp_size, settings.pp_size
    for name, heads in (
        ("num_attention_heads", shape.num_attention_heads),
        ("num_key_value_heads", shape.num_key_value_heads),
    ):
        if heads % tp:
            problems.append(
                PlanProblem(
                    "tp_size",
                    f"tp_size={tp} does not divide {name}={heads} of {settings.model_path}"
                    f" (choose a tp_size that divides {heads})",
                )
            )
    if pp > shape.num_hidden_layers:
        problems.append(
            PlanProblem(
                "pp_size", f"pp_size={pp} exceeds num_hidden_layers={shape.num_hidden_layers}"
            )
        )
    return problems


def _length_problems(settings: BuildSettings, shape: ModelShape) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    if (
        settings.max_num_tokens < settings.max_input_len
        and not settings.triton.enable_chunked_context
    ):
        problems.append(
            PlanProblem(
                "max_num_tokens",
                f"max_num_tokens={settings.max_num_tokens} < max_input_len="
                f"{settings.max_input_len} needs triton.enable_chunked_context=true",
            )
        )
    positions = shape.max_position_embeddings
    if positions is not None and settings.max_seq_len > positions:
        problems.append(
            PlanProblem(
                "max_seq_len",
                f"max_seq_len={settings.max_seq_len} exceeds the model's "
                f"max_position_embeddings={positions}",
            )
        )
    return problems


def _device_problems(
    settings: BuildSettings, devices: Devices, memory: MemoryEstimate
) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    world = settings.world_size
    if devices.count is None:
        problems.append(
            PlanProblem(
                "gpu_count",
                "unknown: nvidia-smi not found here; set gpu_count (and device_memory_mb) "
                "for the machine that will serve this replica",
            )
        )
    elif world > devices.count:
        problems.append(
            PlanProblem(
                "tp_size",
                f"tp_size×pp_size = {settings.tp_size}×{settings.pp_size} = {world} GPUs per "
                f"replica, but {devices.count} available ({devices.source})",
            )
        )
    elif max(settings.device_ids) >= devices.count:
        problems.append(
            PlanProblem(
                "triton.gpu_device_ids",
                f"{settings.device_ids} names a GPU >= the {devices.count} available "
                f"({devices.source})",
            )
        )
    if devices.memory_mb is None:
        problems.append(
            PlanProblem(
                "device_memory_mb",
                "unknown: nvidia-smi not found here; set device_memory_mb (per GPU, MiB)",
            )
        )
    elif memory.total_mb > devices.memory_mb:
        names = f": {', '.join(devices.names)}" if devices.names else ""
        problems.append(
            PlanProblem(
                "device_memory_mb",
                f"the plan needs ~{memory.total_mb:,.0f} MiB per GPU (weights "
                f"{memory.weights_mb:,.0f} + KV cache {memory.kv_cache_mb:,.0f} for "
                f"max_batch_size={settings.max_batch_size} × max_seq_len={settings.max_seq_len}"
                f" + activations {memory.activations_mb:,.0f} + runtime "
                f"{memory.runtime_mb:,.0f}) but the GPU has {devices.memory_mb:,} MiB "
                f"({devices.source}{names}); lower max_batch_size or max_seq_len, raise tp_size, "
                "or quantise",
            )
        )
    return problems


def make_plan(settings: BuildSettings, shape: ModelShape, gpus: list[GpuInfo] | None) -> Plan:
    """The validated plan; ``PlanError`` lists every problem found (all of them, not the first)."""
    devices = resolve_devices(settings, gpus)
    memory = estimate_memory(settings, shape)
    problems = [
        *_parallel_problems(settings, shape),
        *_length_problems(settings, shape),
        *_device_problems(settings, devices, memory),
    ]
    if problems:
        raise PlanError(problems)
    return Plan(settings=settings, shape=shape, devices=devices, memory=memory)
