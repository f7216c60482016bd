"""The Redis load-store contract between sidecars and routers: the one owner of key names.

Documented in ``redis/SCHEMA.md``. (The folder ``redis/`` holds the config, the doc and the Lua
scripts; this module lives in ``triage/`` because a Python package named ``redis`` would shadow
redis-py.)

Keys, all under a prefix (default ``triage:``):

* ``replica:{id}`` hash, written by the replica's sidecar every poll, ``PEXPIRE`` 4 × interval;
  fields are those of ``ReplicaState``. Missing or expired means "unknown".
* ``model:{name}:replicas`` set of replica ids serving the model (membership).
* ``inflight:{id}`` sorted set: reservations on the replica by all proxies, not yet finished
  (member = reservation id, score = lease expiry in ms, renewed by the holding proxy); the count
  is the unexpired members (none while the replica is reported down).
* ``admitted:{model}``, ``queue:{model}``, ``queuelease:{model}``, ``fair:{model}``,
  ``queueflow:{model}``, ``flowqueued:{model}``, ``deadlines:{model}``: the admission gate
  (``plugins/admission/gate.lua``).
* ``apikey:{sha256}`` hash: one virtual key's record (offline key store); ``apikeys`` set of
  the hashes. Keys themselves are never stored.
* ``server:{id}`` hash, written by the server's sidecar(s) every poll, ``PEXPIRE`` 4 × interval:
  the Triton server's topology (devices, memory: constant) and liveness (``ServerState``).
* ``loading:{model}``: the model catalogue's cold-load lock (value: the server it loads on).
* ``loadfailed:{server}:{model}``: a failed load's reason; the server is not retried for the
  model until it expires (the cooldown).
* ``lastused:{model}`` hash: server id -> last time (ms) a request was sent to the model there
  (least-recently-used unloading).
* ``prefix:{id}`` sorted set: the replica's prefix index, written by the pick
  (``pick_lib.lua``): member = a salted hash of a prompt's leading block (16 hex digits, never
  text), score = the time (ms) of the last pick that sent it there x 1024 + (1023 - its block
  position), so older prompts, and within one prompt its later blocks, are forgotten first;
  bounded to the blocks the replica's KV cache holds, expires an hour after the last pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_PREFIX = "triage:"
TTL_POLLS = 4  # replica hash lives for this many poll intervals


@dataclass(frozen=True)
class KeySchema:
    prefix: str = DEFAULT_PREFIX

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}replica:{replica_id}"

    def model_replicas(self, model: str) -> str:
        return f"{self.prefix}model:{model}:replicas"

    def inflight(self, replica_id: str) -> str:
        return f"{self.prefix}inflight:{replica_id}"

    def admitted(self, model: str) -> str:
        """Sorted set of admission tickets of ``model`` (score: lease expiry, ms)."""
        return f"{self.prefix}admitted:{model}"

    def queue(self, model: str) -> str:
        """Sorted set: the gateway wait queue of ``model`` (score: priority * 2^40 + the
        request's start tag in the fair order)."""
        return f"{self.prefix}queue:{model}"

    def queue_lease(self, model: str) -> str:
        """Sorted set: expiry (ms) of each waiting ticket's place in the queue."""
        return f"{self.prefix}queuelease:{model}"

    def fair(self, model: str) -> str:
        """Hash: the fair order of ``model``'s queue: ``v:<priority>`` the tier's virtual time,
        ``f:<priority>:<flow>`` the flow's last finish tag (``plugins/admission/rules.py``)."""
        return f"{self.prefix}fair:{model}"

    def queue_flow(self, model: str) -> str:
        """Hash: each queued ticket of ``model`` -> its flow."""
        return f"{self.prefix}queueflow:{model}"

    def flow_queued(self, model: str) -> str:
        """Hash: each flow -> its places in ``model``'s queue."""
        return f"{self.prefix}flowqueued:{model}"

    def deadlines(self, model: str) -> str:
        """Sorted set: each queued ticket of ``model`` with a time-to-first-token deadline ->
        the end of its place (ms)."""
        return f"{self.prefix}deadlines:{model}"

    def grant_seq(self, model: str) -> str:
        """Integer: grants of ``model``'s queue so far (each grant message carries its number)."""
        return f"{self.prefix}grantseq:{model}"

    def grants(self, model: str) -> str:
        """Pub/sub channel: each ticket of ``model`` granted a slot after waiting in the queue."""
        return f"{self.prefix}grants:{model}"

    def enqueue_seq(self, model: str) -> str:
        """Integer: requests that joined ``model``'s queue so far (each enqueue message carries
        its number)."""
        return f"{self.prefix}enqueueseq:{model}"

    def enqueues(self, model: str) -> str:
        """Pub/sub channel: ``<number> <priority> <ticket>`` for each request that joined the
        queue."""
        return f"{self.prefix}enqueues:{model}"

    def api_key(self, key_hash: str) -> str:
        """Hash of one virtual key's record, by the SHA-256 hex of the key (never the key)."""
        return f"{self.prefix}apikey:{key_hash}"

    def api_keys(self) -> str:
        """Set of the SHA-256 hex of every key (for listing)."""
        return f"{self.prefix}apikeys"

    def server(self, server_id: str) -> str:
        """Hash: one Triton server's topology and liveness (``ServerState``)."""
        return f"{self.prefix}server:{server_id}"

    def loading(self, model: str) -> str:
        """String with expiry: the cold-load lock of ``model``; value = the server loading it."""
        return f"{self.prefix}loading:{model}"

    def load_failed(self, server_id: str, model: str) -> str:
        """String with expiry: why loading ``model`` on ``server_id`` failed (cooldown)."""
        return f"{self.prefix}loadfailed:{server_id}:{model}"

    def prefix_index(self, replica_id: str) -> str:
        """Sorted set: the replica's prefix index (salted block hashes -> last use)."""
        return f"{self.prefix}prefix:{replica_id}"

    def last_used(self, model: str) -> str:
        """Hash: server id -> last request time (ms) of ``model`` on that server."""
        return f"{self.prefix}lastused:{model}"


HealthState = Literal["healthy", "suspect", "unhealthy", "unloaded"]
"""``unloaded``: the server is up but the model is not loaded on it (explicit model control)."""


class ReplicaState(BaseModel):
    """One replica's published load: the fields of the ``replica:{id}`` hash.

    No prompt text or user data ever goes here: only counts, rates and identities.
    """

    replica_id: str
    model: str
    api_base: str
    waiting: int = Field(
        ge=0,
        description="queued, not yet active: Triton's own queue + the executor's queue behind "
        "max_active, estimated from Triton's request counters (no metric shows it)",
    )
    active: int = Field(
        ge=0,
        description="requests active in the engine (TensorRT-LLM's numActiveRequests; its "
        "`waiting` gauge is a subset of these, not a queue)",
    )
    max_active: int = Field(
        ge=1, description="the executor's cap on active requests (C_i; TensorRT-LLM's `max`)"
    )
    kv_fraction: float = Field(ge=0.0, le=1.0, description="KV-cache blocks used / max")
    kv_tokens: int | None = Field(
        default=None,
        ge=0,
        description="KV-cache capacity in tokens (TensorRT-LLM's max blocks x tokens per block): "
        "bounds the replica's prefix index (blocks it may hold cached)",
    )
    service_ms: float | None = Field(
        default=None,
        ge=0.0,
        description="the replica's time unit (s_i): ms per engine iteration (TensorRT-LLM "
        "iteration counter), else the mean time a request is active over the window",
    )
    drain_rps: float | None = Field(
        default=None, ge=0.0, description="finished requests per second (Triton's counters)"
    )
    request_ms: float | None = Field(
        default=None,
        ge=0.0,
        description="mean time a request is active in the engine (ms, Little's law: mean "
        "active / finished per second) over the window, kept while idle: with max_active, "
        "the replica's throughput at full load",
    )
    healthy: bool
    state: HealthState
    source: Literal["trtllm", "triton"] = Field(
        description="trtllm: nv_trt_llm_* gauges; triton: nv_inference_pending_request_count"
    )
    ts_ms: int = Field(description="publish time, ms since the epoch")
    sample_ts_ms: int = Field(description="time of the last successful poll, ms since the epoch")

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                out[name] = ""
            elif isinstance(value, bool):
                out[name] = "1" if value else "0"
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[bytes | str, bytes | str]) -> ReplicaState:
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        cleaned: dict[str, object] = {k: (None if v == "" else v) for k, v in data.items()}
        if "healthy" in cleaned:
            cleaned["healthy"] = cleaned["healthy"] == "1"
        return cls.model_validate(cleaned)


class ServerState(BaseModel):
    """One Triton server as its sidecar sees it: the fields of the ``server:{id}`` hash."""

    server_id: str
    api_base: str
    device_count: int = Field(ge=0, description="GPUs the server may use (0: CPU only)")
    device_memory_mb: int = Field(ge=0, description="memory of each device, MiB")
    healthy: bool
    ts_ms: int = Field(description="publish time, ms since the epoch")

    def to_redis(self) -> dict[str, str]:
        return {
            name: ("1" if value else "0") if isinstance(value, bool) else str(value)
            for name, value in self.model_dump().items()
        }

    @classmethod
    def from_redis(cls, raw: dict[bytes | str, bytes | str]) -> ServerState:
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return cls.model_validate({**data, "healthy": data.get("healthy") == "1"})
