"""Settings of the Locust load (``TRIAGE_LOAD_*`` or the same flags, e.g. ``--scenario burst``),
and their resolution against a running stack (``stack.json``: URLs, key, fleet timing, PIDs).

No Locust import here: the locustfile registers these fields as Locust arguments (so they show
in the web UI and travel to workers) and validates them with this model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loadtests.scenarios import Scenario, ScenarioKind
from loadtests.traffic import KeyTier, LengthDist, StandinTiming, load_keys
from loadtests.workloads import WorkloadSettings
from plugins.admission.settings import AdmissionSettings

STACK_STATE_ENV = "TRIAGE_STACK_STATE"  # the same variable ``triage keys`` reads


class LoadSettings(BaseSettings, WorkloadSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_LOAD_", extra="forbid")

    stack_state: Path | None = Field(
        default=None,
        description="stack.json of a running `triage up` (or its workdir): URLs, key, fleet "
        f"timing, replica PIDs; default ${STACK_STATE_ENV}",
    )
    base_urls: str = Field(
        default="",
        description="proxy base URLs, comma-separated (users are spread over them); default "
        "--host, else every proxy of the stack",
    )
    api_key: str = Field(default="", description="virtual key; default the stack's")
    keys_file: Path | None = Field(
        default=None,
        description='JSON list of {"key", "priority", "weight", "tier"}: several keys, by weight',
    )
    model: str = Field(default="", description="model name; default the stack's")
    scenario: ScenarioKind = Field(default="steady", description="steady|skewed|ramp|burst|kill")
    duration_s: float = Field(default=60.0, gt=0, description="seconds of arrivals")
    load: float = Field(default=0.85, ge=0, le=20, description="offered fraction of capacity")
    ramp_from: float = Field(default=0.1, ge=0, le=20, description="ramp: first load")
    ramp_to: float = Field(default=1.2, ge=0, le=20, description="ramp: last load")
    burst_load: float = Field(default=2.0, ge=0, le=20, description="burst: load in the burst")
    burst_at_s: float = Field(default=20.0, ge=0, description="burst: start")
    burst_s: float = Field(default=10.0, ge=0, description="burst: length")
    kill_at_s: float = Field(default=20.0, ge=0, description="kill: when the replica dies")
    kill_replica: str = Field(default="", description="kill: replica id; default the first one")
    kill_command: str = Field(
        default="",
        description="kill: shell command run instead of SIGKILL to the stack's PID "
        "($TRIAGE_KILL_REPLICA names the replica)",
    )
    drain_s: float | None = Field(
        default=None,
        ge=0,
        description="after the arrivals: in-flight requests may finish for this long; default "
        "the longest one may still take (max_wait_s + the longest service + max_retries x "
        "max_retry_wait_s); the run ends sooner once every request is answered",
    )
    max_wait_s: float = Field(
        default=AdmissionSettings.model_fields["max_wait_ms"].default / 1000,
        ge=0,
        description="the gateway's longest queue wait (the admission plugin's max_wait_ms), for "
        "the default drain",
    )
    capacity_rps: float | None = Field(
        default=None, gt=0, description="fleet capacity, req/s; default computed from stack.json"
    )
    user_rps: float = Field(default=0.25, gt=0, le=100, description="Poisson rate of one user")
    prompt_tokens: str = Field(default="uniform:16,64", description="prompt length distribution")
    output_tokens: str = Field(default="fixed:25", description="max_tokens distribution")
    stream_fraction: float = Field(default=0.5, ge=0, le=1, description="share of streams")
    max_retries: int = Field(default=3, ge=0, le=20, description="retries after 503/429")
    max_retry_wait_s: float = Field(default=30.0, ge=0, description="cap on one Retry-After wait")
    request_timeout_s: float = Field(default=120.0, gt=0, description="per attempt")
    report_dir: Path = Field(
        default=Path("run/locust"), description="report + PNG plots (run/ is git-ignored)"
    )
    report_grace_s: float = Field(
        default=4.0, ge=0, description="master: wait for the workers' last reports"
    )
    seed: int = Field(default=0, description="random seed (users add their index)")

    @field_validator("prompt_tokens", "output_tokens")
    @classmethod
    def _dist(cls, spec: str) -> str:
        return str(LengthDist.parse(spec))

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, value: str) -> str:
        urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"not an http(s) URL: {url!r}")
        return ",".join(urls)

    def scenario_spec(self, drain_s: float | None = None) -> Scenario:
        """The schedule; ``drain_s`` when this run's drain is worked out (``Resolved.drain_s``)."""
        return Scenario(
            kind=self.scenario,
            duration_s=self.duration_s,
            load=self.load,
            ramp_from=self.ramp_from,
            ramp_to=self.ramp_to,
            burst_load=self.burst_load,
            burst_at_s=self.burst_at_s,
            burst_s=self.burst_s,
            kill_at_s=self.kill_at_s,
            drain_s=drain_s if drain_s is not None else (self.drain_s or 0.0),
        )

    def prompt_dist(self) -> LengthDist:
        return LengthDist.parse(self.prompt_tokens)

    def output_dist(self) -> LengthDist:
        return LengthDist.parse(self.output_tokens)


class Resolved(BaseModel):
    """What the master works out once and sends to the workers (inside Locust's options)."""

    base_urls: list[str]
    keys: list[KeyTier]
    model: str
    capacity_rps: float
    replica_ids: list[str] = Field(default_factory=list)
    replica_pids: dict[str, int] = Field(default_factory=dict)
    speeds: list[float] = Field(default_factory=list)
    drain_s: float = 15.0
    """The drain: ``--drain-s``, or the longest a request may still take (``default_drain_s``)."""


def read_stack_state(path: Path | None) -> dict[str, Any] | None:
    """``stack.json`` (a file or a stack workdir), or ``$TRIAGE_STACK_STATE``; None if neither."""
    if path is None:
        env = os.environ.get(STACK_STATE_ENV)
        if not env:
            return None
        path = Path(env)
    if path.is_dir():
        path = path / "stack.json"
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a stack.json object")
    return data


def default_drain_s(settings: LoadSettings, longest_service_s: float) -> float:
    """The longest a request sent as the arrivals stop may still take: its wait in the gateway's
    queue, its service on the slowest replica, and every Retry-After wait it may be asked for
    (the run ends sooner when all are answered: ``ScenarioShape``)."""
    retries = settings.max_retries * settings.max_retry_wait_s
    return settings.max_wait_s + min(longest_service_s, settings.request_timeout_s) + retries


def resolve(settings: LoadSettings, host: str | None) -> Resolved:
    """URLs, keys, model and capacity from the settings, the host and the stack's state.
    Raises ValueError naming the setting that is missing."""
    stack = read_stack_state(settings.stack_state)
    urls = [u for u in settings.base_urls.split(",") if u]
    if not urls and host:
        urls = [host.rstrip("/")]
    if not urls and stack:
        urls = [u for u in stack.get("proxy_urls") or [] if u]
    if not urls:
        raise ValueError("base_urls: no proxy URL (give --host, --base-urls or --stack-state)")
    if settings.keys_file is not None:
        keys = load_keys(settings.keys_file)
    elif settings.api_key:
        keys = [KeyTier(key=settings.api_key)]
    elif stack and stack.get("api_key"):
        keys = [KeyTier(key=str(stack["api_key"]))]
    else:
        raise ValueError("api_key: no key (give --api-key, --keys-file or --stack-state)")
    model = settings.model or (str(stack["model"]) if stack and stack.get("model") else "standin")
    replicas: dict[str, Any] = (stack or {}).get("replicas") or {}
    speeds = [float(r.get("speed", 1.0)) for r in replicas.values()]
    capacity = settings.capacity_rps
    if capacity is None:
        if not stack or not replicas or "standin" not in stack:
            raise ValueError(
                "capacity_rps: unknown (give --capacity-rps, or --stack-state of a stack that "
                "describes its stand-in timing)"
            )
        timing = StandinTiming.from_mapping(stack["standin"])
        capacity = timing.fleet_rps(
            speeds, settings.output_dist().mean(), settings.prompt_dist().mean()
        )
    longest_service = settings.request_timeout_s
    if stack and replicas and "standin" in stack:
        timing = StandinTiming.from_mapping(stack["standin"])
        longest_service = timing.service_s(
            settings.output_dist().upper(), settings.prompt_dist().upper(), min(speeds)
        )
    drain = settings.drain_s
    if drain is None:
        drain = default_drain_s(settings, longest_service)
    return Resolved(
        drain_s=drain,
        base_urls=urls,
        keys=keys,
        model=model,
        capacity_rps=capacity,
        replica_ids=list(replicas),
        replica_pids={rid: int(r["pid"]) for rid, r in replicas.items() if r.get("pid")},
        speeds=speeds,
    )
