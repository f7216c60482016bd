"""``triage build-engine``: validate the plan, convert and build (engine path), write the Triton
repository and the manifest. ``--dry-run`` validates and prints the exact commands only.

Exit codes: 0 done, 1 a step failed (its log named), 2 invalid settings or plan (field named).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from build_engines.commands import BuildStep, build_steps
from build_engines.gpus import GpuInfo, query_gpus
from build_engines.manifest import (
    build_manifest,
    engine_path_supported,
    trtllm_version,
    write_manifest,
)
from build_engines.model_shape import ModelShape, ModelShapeError
from build_engines.plan import Plan, PlanError, PlanProblem, make_plan
from build_engines.repository import ENGINE_MODELS, llmapi_model_yaml, write_repository
from build_engines.runner import StepFailed, run_steps
from build_engines.settings import (
    ENGINE_PATH_TRTLLM,
    BuildSettings,
    SettingsFileError,
    load_settings,
)
from core.settings_errors import report_invalid
from sidecar.tp_launcher import TpReplicaSettings, launch_argv

Echo = Callable[[str], None]
GpuQuery = Callable[[], list[GpuInfo] | None]
PROG = "triage build-engine"


@dataclass(frozen=True)
class BuildResult:
    plan: Plan
    steps: list[BuildStep]
    repository: Path | None
    manifest: Path | None


def launch_settings(settings: BuildSettings, replica_id: str = "replica-0") -> TpReplicaSettings:
    """How ``sidecar.tp_launcher`` starts the replica this build serves (default ports)."""
    return TpReplicaSettings(
        replica_id=replica_id,
        repository=settings.repository_dir,
        serving=settings.serving,
        world_size=settings.world_size if settings.serving == "engine" else 1,
        model=None if settings.serving == "engine" else settings.triton.llmapi_model_name,
        max_active=settings.max_batch_size if settings.serving == "llmapi" else None,
    )


def launch_hint(settings: BuildSettings) -> str:
    argv = ["python", "-m", "sidecar.tp_launcher", "--replica-id", "replica-0"]
    argv += ["--repository", str(settings.repository_dir), "--serving", settings.serving]
    if settings.serving == "engine":
        argv += ["--world-size", str(settings.world_size)]
    else:
        argv += ["--model", settings.triton.llmapi_model_name]
        argv += ["--max-active", str(settings.max_batch_size)]
    return shlex.join(argv)


def print_dry_run(plan: Plan, steps: list[BuildStep], echo: Echo) -> None:
    s = plan.settings
    echo("commands:" if steps else "commands: none (LLM-API path: no build step)")
    for step in steps:
        echo(f"  {step.shell()}")
    models = ENGINE_MODELS if s.serving == "engine" else (s.triton.llmapi_model_name,)
    echo(f"repository: {s.repository_dir} ({', '.join(models)})")
    if s.serving == "llmapi":
        body = yaml.safe_dump(llmapi_model_yaml(s), sort_keys=False)
        echo(f"{s.triton.llmapi_model_name}/1/model.yaml:")
        for line in body.splitlines():
            echo(f"  {line}")
    echo(f"launch: {launch_hint(s)}")
    echo(f"  runs: {shlex.join(launch_argv(launch_settings(s)))}")


def preflight(settings: BuildSettings, steps: list[BuildStep]) -> list[PlanProblem]:
    """What must hold before the first step runs: tensorrt-llm 1.2.x, no clobbered output."""
    if not steps:
        return []
    problems: list[PlanProblem] = []
    version = trtllm_version(settings.python)
    if version is None:
        problems.append(
            PlanProblem(
                "python",
                f"tensorrt-llm is not installed in {settings.python} (the engine path needs "
                f"tensorrt-llm{ENGINE_PATH_TRTLLM}, e.g. pip install tensorrt-llm==1.2.1)",
            )
        )
    elif not engine_path_supported(version):
        problems.append(
            PlanProblem(
                "python",
                f"tensorrt-llm {version} in {settings.python} has no engine path; "
                f"it needs tensorrt-llm{ENGINE_PATH_TRTLLM} (or serving: llmapi)",
            )
        )
    for step in steps:
        if step.produces.exists() and any(step.produces.iterdir()) and not settings.overwrite:
            problems.append(
                PlanProblem(
                    "overwrite", f"{step.produces} exists and is not empty; pass --overwrite"
                )
            )
    return problems


def run_build(
    settings: BuildSettings, echo: Echo = print, gpus: GpuQuery = query_gpus
) -> BuildResult:
    """Everything after settings: raises ModelShapeError, PlanError, StepFailed."""
    shape = ModelShape.from_model_dir(settings.model_path)
    try:
        found = gpus()
    except (RuntimeError, OSError, ValueError) as exc:  # nvidia-smi present but failing
        raise PlanError([PlanProblem("gpu_count", f"nvidia-smi failed: {exc}")]) from exc
    plan = make_plan(settings, shape, found)
    for line in plan.describe():
        echo(line)
    steps = build_steps(settings)
    if settings.dry_run:
        print_dry_run(plan, steps, echo)
        return BuildResult(plan, steps, None, None)
    problems = preflight(settings, steps)
    if problems:
        raise PlanError(problems)
    for step in steps:
        if step.produces.exists():
            shutil.rmtree(step.produces)
    results = run_steps(steps, echo)
    repository = write_repository(settings)
    echo(f"repository written to {repository}")
    version = trtllm_version(settings.python)
    manifest = write_manifest(
        build_manifest(plan, steps, results, version, repository), settings.manifest_path
    )
    echo(f"manifest written to {manifest}")
    echo(f"launch: {launch_hint(settings)}")
    return BuildResult(plan, steps, repository, manifest)


def main(argv: Sequence[str] | None = None, gpus: GpuQuery = query_gpus) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        return report_invalid(PROG, exc)
    except SettingsFileError as exc:
        print(f"{PROG}: invalid setting settings: {exc}", file=sys.stderr)
        return 2
    try:
        run_build(settings, echo=lambda line: print(line, flush=True), gpus=gpus)
    except ModelShapeError as exc:
        print(f"{PROG}: invalid setting model_dir: {exc}", file=sys.stderr)
        return 2
    except PlanError as exc:
        for problem in exc.problems:
            print(f"{PROG}: invalid plan: {problem}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
