"""One settings file for a TensorRT-LLM replica: engine build, Triton repository, serving limits.

``triage build-engine --settings llama-tp2.yaml [--tp-size 4 ...]``: the file (YAML, or TOML by
suffix) gives the values, CLI flags (kebab-case, the same names) override them, and so do
environment variables ``TRIAGE_BUILD_<NAME>`` (nested: ``TRIAGE_BUILD_TRITON__MAX_QUEUE_SIZE``).
Unknown keys are errors. Checks that need nothing but the settings live here; checks that need the
model's ``config.json`` or the GPUs live in ``plan.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

Serving = Literal["engine", "llmapi"]
Dtype = Literal["float16", "bfloat16", "float32"]
Quantization = Literal["none", "int8_wo", "int4_wo"]

# TensorRT-LLM 1.2.x is the last line with the engine path (convert_checkpoint + trtllm-build).
ENGINE_PATH_TRTLLM = ">=1.2,<1.3"


def _distinct(values: list[int] | None, name: str) -> list[int] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {values}")
    if values is not None and any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    return values


class TritonRepositorySettings(BaseModel):
    """What goes into the generated Triton model repository (``triton:`` in the file)."""

    model_config = ConfigDict(extra="forbid")

    repository_dir: Path | None = Field(
        default=None,
        description="where the repository is written; default <output_dir>/triton_repo",
    )
    tokenizer_dir: Path | None = Field(default=None, description="default: model_dir")
    max_queue_size: int = Field(
        default=64,
        ge=1,
        description="the tensorrt_llm model's queue (becomes the executor's max queue size)",
    )
    queue_timeout_ms: int | None = Field(
        default=60_000, ge=1, description="Triton queue timeout (REJECT); null: none"
    )
    decoupled: bool = Field(default=True, description="streaming needs a decoupled model")
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = (
        "guaranteed_no_evict"
    )
    kv_cache_free_gpu_mem_fraction: float = Field(default=0.9, gt=0, le=1)
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool = True
    exclude_input_in_output: bool = Field(
        default=True, description="answer the completion only, like the CPU stand-in"
    )
    max_beam_width: int = Field(default=1, ge=1)
    gpu_device_ids: list[int] | None = Field(
        default=None, description="GPUs of this replica, one per rank; default 0..world_size-1"
    )
    participant_ids: list[int] | None = Field(
        default=None, description="MPI ranks (orchestrator mode only); unset in leader mode"
    )
    preprocessing_instances: int = Field(default=1, ge=1)
    postprocessing_instances: int = Field(default=1, ge=1)
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    executor_worker_path: str = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
    llmapi_model_name: str = Field(default="tensorrt_llm", pattern=r"^[A-Za-z0-9_.\-]+$")

    @field_validator("gpu_device_ids", "participant_ids")
    @classmethod
    def _distinct_ids(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        return _distinct(value, info.field_name or "ids")


class BuildSettings(BaseSettings):
    """Everything ``triage build-engine`` needs; see build_engines/README.md for each field."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BUILD_",
        env_nested_delimiter="__",
        cli_prog_name="triage build-engine",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    settings: Path | None = Field(
        default=None, description="settings file (YAML, or TOML by suffix); flags override it"
    )
    serving: Serving = Field(
        default="engine",
        description="engine: convert_checkpoint + trtllm-build + the inflight-batcher ensemble "
        "(TensorRT-LLM 1.2.x); llmapi: the LLM API / PyTorch backend, no build step",
    )
    model_dir: Path = Field(description="Hugging Face checkpoint on disk (config.json, weights)")
    output_dir: Path = Field(description="checkpoint/, engine/, triton_repo/, logs/, manifest")
    dtype: Dtype = "bfloat16"
    quantization: Quantization = Field(
        default="none", description="engine path: int8_wo / int4_wo weight-only"
    )
    tp_size: int = Field(default=1, ge=1, le=64, description="tensor parallelism (GPUs per stage)")
    pp_size: int = Field(default=1, ge=1, le=64, description="pipeline parallelism (stages)")
    max_batch_size: int = Field(default=64, ge=1)
    max_input_len: int = Field(default=4096, ge=1)
    max_seq_len: int = Field(default=8192, ge=2, description="prompt + completion")
    max_num_tokens: int = Field(default=8192, ge=1, description="tokens per engine step")
    device_memory_mb: int | None = Field(
        default=None, ge=1, description="per-GPU memory (MiB) when nvidia-smi is absent"
    )
    gpu_count: int | None = Field(
        default=None, ge=1, description="GPUs on the serving machine when nvidia-smi is absent"
    )
    runtime_overhead_mb: int = Field(
        default=2048, ge=0, description="CUDA context, cuBLAS/NCCL workspaces, decoder buffers"
    )
    python: str = Field(
        default_factory=lambda: sys.executable,
        description="interpreter with tensorrt-llm installed (runs the conversion)",
    )
    convert_script: Path | None = Field(
        default=None,
        description="NVIDIA's examples/models/core/<family>/convert_checkpoint.py from a v1.2.x "
        "checkout; default: build_engines.convert_checkpoint (same flags, wheel API only)",
    )
    trtllm_build: str = Field(default="trtllm-build", description="the trtllm-build executable")
    dry_run: bool = Field(default=False, description="validate and print the commands only")
    overwrite: bool = Field(default=False, description="replace an existing checkpoint/engine")
    repository_only: bool = Field(
        default=False, description="skip conversion and build: (re)write repository + manifest"
    )
    triton: TritonRepositorySettings = Field(default_factory=TritonRepositorySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CliApp puts the CLI first; then init kwargs, env, and the settings file last
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )

    @field_validator("max_seq_len")
    @classmethod
    def _seq_covers_input(cls, value: int, info: ValidationInfo) -> int:
        max_input = info.data.get("max_input_len")
        if max_input is not None and max_input >= value:
            raise ValueError(
                f"max_seq_len={value} must exceed max_input_len={max_input} "
                "(it holds the prompt and at least one generated token)"
            )
        return value

    @field_validator("quantization")
    @classmethod
    def _quantization_needs_engine(cls, value: str, info: ValidationInfo) -> str:
        if value != "none" and info.data.get("serving") == "llmapi":
            raise ValueError(
                f"quantization={value} applies to the engine path only; the LLM-API path serves "
                "the checkpoint as stored (quantise it with ModelOpt first)"
            )
        return value

    @field_validator("triton")
    @classmethod
    def _ids_match_world(
        cls, value: TritonRepositorySettings, info: ValidationInfo
    ) -> TritonRepositorySettings:
        world = info.data.get("tp_size", 1) * info.data.get("pp_size", 1)
        for name in ("gpu_device_ids", "participant_ids"):
            ids = getattr(value, name)
            if ids is not None and len(ids) != world:
                raise ValueError(
                    f"triton.{name} has {len(ids)} entries {ids} but tp_size×pp_size = {world}"
                )
        return value

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def output_root(self) -> Path:
        return self.output_dir.expanduser().resolve()

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_root / "checkpoint"

    @property
    def engine_dir(self) -> Path:
        return self.output_root / "engine"

    @property
    def logs_dir(self) -> Path:
        return self.output_root / "logs"

    @property
    def manifest_path(self) -> Path:
        return self.output_root / "manifest.json"

    @property
    def repository_dir(self) -> Path:
        configured = self.triton.repository_dir
        return configured.expanduser().resolve() if configured else self.output_root / "triton_repo"

    @property
    def model_path(self) -> Path:
        return self.model_dir.expanduser().resolve()

    @property
    def tokenizer_path(self) -> Path:
        configured = self.triton.tokenizer_dir
        return configured.expanduser().resolve() if configured else self.model_path

    @property
    def device_ids(self) -> list[int]:
        return self.triton.gpu_device_ids or list(range(self.world_size))


class SettingsFileError(ValueError):
    """The settings file is missing or of an unknown kind."""


def _settings_file(argv: Sequence[str]) -> Path | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--settings", type=Path)
    known, _ = parser.parse_known_args(list(argv))
    return known.settings


def load_settings(argv: Sequence[str]) -> BuildSettings:
    """Settings from ``--settings FILE`` (if given), env and CLI flags (flags win).

    Raises ``pydantic.ValidationError`` (field named) or ``SettingsFileError``.
    """
    path = _settings_file(argv)
    cls: type[BuildSettings] = BuildSettings
    if path is not None:
        if not path.is_file():
            raise SettingsFileError(f"settings file {path} not found")
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            key = "yaml_file"
        elif suffix == ".toml":
            key = "toml_file"
        else:
            raise SettingsFileError(f"settings file {path}: use .yaml, .yml or .toml")
        config = SettingsConfigDict(**{**BuildSettings.model_config, key: path})  # type: ignore[typeddict-item]
        cls = type("BuildSettingsFromFile", (BuildSettings,), {"model_config": config})
    return CliApp.run(cls, cli_args=list(argv))
