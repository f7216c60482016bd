"""The exact commands of an engine build (pure: settings in, argv lists out).

Engine path (TensorRT-LLM 1.2.x): ``convert_checkpoint.py --tp_size N --pp_size M`` shards the
Hugging Face weights per rank (TP is fixed here), then ``trtllm-build`` compiles one engine per
rank. The LLM-API path has no build step.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from build_engines.settings import BuildSettings
from core.paths import REPO_ROOT

CONVERT_MODULE = "build_engines.convert_checkpoint"
QUANTIZATION_FLAGS: dict[str, list[str]] = {
    "none": [],
    "int8_wo": ["--use_weight_only", "--weight_only_precision", "int8"],
    "int4_wo": ["--use_weight_only", "--weight_only_precision", "int4"],
}


@dataclass(frozen=True)
class BuildStep:
    name: str
    argv: list[str]
    log_path: Path
    produces: Path
    env: dict[str, str] = field(default_factory=dict)
    """Added to the environment (``PYTHONPATH`` so ``-m build_engines...`` imports anywhere)."""

    def shell(self) -> str:
        return shlex.join(self.argv)


def convert_argv(settings: BuildSettings) -> list[str]:
    if settings.convert_script is not None:
        head = [settings.python, str(settings.convert_script.expanduser().resolve())]
    else:
        head = [settings.python, "-m", CONVERT_MODULE]
    return [
        *head,
        "--model_dir",
        str(settings.model_path),
        "--output_dir",
        str(settings.checkpoint_dir),
        "--dtype",
        settings.dtype,
        "--tp_size",
        str(settings.tp_size),
        "--pp_size",
        str(settings.pp_size),
        *QUANTIZATION_FLAGS[settings.quantization],
    ]


def build_argv(settings: BuildSettings) -> list[str]:
    return [
        settings.trtllm_build,
        "--checkpoint_dir",
        str(settings.checkpoint_dir),
        "--output_dir",
        str(settings.engine_dir),
        "--max_batch_size",
        str(settings.max_batch_size),
        "--max_input_len",
        str(settings.max_input_len),
        "--max_seq_len",
        str(settings.max_seq_len),
        "--max_num_tokens",
        str(settings.max_num_tokens),
        "--max_beam_width",
        str(settings.triton.max_beam_width),
        "--kv_cache_type",
        "paged",
        "--gemm_plugin",
        "auto",
        "--remove_input_padding",
        "enable",
        "--use_paged_context_fmha",
        "enable",
    ]


def build_steps(settings: BuildSettings) -> list[BuildStep]:
    """The steps to run, in order; none for the LLM-API path or ``repository_only``."""
    if settings.serving != "engine" or settings.repository_only:
        return []
    env = {"PYTHONPATH": str(REPO_ROOT)}
    return [
        BuildStep(
            "convert_checkpoint",
            convert_argv(settings),
            settings.logs_dir / "convert_checkpoint.log",
            settings.checkpoint_dir,
            env,
        ),
        BuildStep(
            "trtllm-build",
            build_argv(settings),
            settings.logs_dir / "trtllm-build.log",
            settings.engine_dir,
        ),
    ]
