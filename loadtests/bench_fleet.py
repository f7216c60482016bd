"""What every benchmark of ``triage bench`` shares: the fleet's settings (each subcommand's own
model adds to them under its own env prefix: ``TRIAGE_BENCH_`` for ``compare``,
``TRIAGE_BENCH_DECISIONS_``, ``TRIAGE_BENCH_BURST_``), the strategies compared, and the CPU
groups measured per run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings

from core.speeds import check_speeds
from devstack.proxy_launcher import LiteLLMProxy
from devstack.stack import Stack
from loadtests.measure import CpuGroups

Strategy = Literal["simple-shuffle", "least-busy", "triage"]
OURS: Strategy = "triage"


class FleetSettings(BaseSettings):
    """The stand-in fleet a benchmark starts (``devstack.stack``). A subclass sets its env
    prefix, and its own defaults where its measurement needs them (with the reason)."""

    replicas: int = Field(default=3, ge=1, le=8, description="Triton stand-in replicas")
    speeds: list[float] = Field(
        default=[1.0, 1.0, 0.5], description="speed per replica, e.g. [1,1,0.5]"
    )
    max_active: int = Field(default=4, ge=1, le=64, description="batch slots per replica")
    poll_interval_ms: int = Field(default=250, ge=20, description="sidecar poll period")
    num_retries: int = Field(default=2, ge=0, description="router retries on another replica")
    workdir: Path | None = Field(default=None, description="stack logs; default a temp dir")

    @field_validator("speeds")
    @classmethod
    def _speeds(cls, speeds: list[float], info: ValidationInfo) -> list[float]:
        return check_speeds(speeds, info.data.get("replicas", 3))


def check_strategies(strategies: list[Strategy]) -> list[Strategy]:
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be distinct and non-empty: {strategies}")
    return strategies


def pids(parts: Sequence[Any]) -> list[int]:
    """Process-group leaders of the running parts (each part leads its own group)."""
    out = []
    for part in parts:
        process = getattr(part, "process", None)
        if process is not None and getattr(process, "proc", None) is not None:
            out.append(int(process.pid))
    return out


def cpu_groups(
    stack: Stack, measured: Sequence[LiteLLMProxy], idle: Sequence[LiteLLMProxy]
) -> CpuGroups:
    """The CPU groups of one run: the proxies under load, the idle ones, Triton, the rest."""
    return CpuGroups(
        {
            "proxies": pids(measured),
            "idle proxies": pids(idle),
            "triton": pids(list(stack.replicas.values())),
            "sidecars+redis": pids([*stack.sidecars.values(), stack.redis]),
        }
    )
