"""Who shares what with whom: the prompt structure of a benchmark's requests.

* ``independent``: one user message of its own (no two requests share text).
* ``shared-prefix``: its tenant's system prompt (``prefix_tokens``; ``tenants`` of them, chosen
  uniformly), then a user message of its own.
* ``hot-tenant``: the same, but tenant 0 sends ``hot_share`` of the traffic, the others share
  the rest uniformly.
* ``multi-turn``: a conversation: ``sessions`` are open at once, each request is the next turn
  of one of them (chosen uniformly); turn ``k`` sends the conversation so far (a short system
  prompt, then ``k`` user messages and answers) and a new user message, every message of
  ``turn_tokens`` (the arrival's ``prompt_tokens`` is not used): each turn's prompt starts with
  the whole prompt of the turn before. A conversation ends after ``turns`` turns and a new one
  opens.

The prompt's own user message has the arrival's ``prompt_tokens`` (words drawn at random: no two
requests share a block of it); its output, ``max_tokens``.
Texts are words the stand-in counts as one token each, drawn from seeded streams: a tenant's
system prompt, or a conversation's earlier turns, is the same text in every request that carries
it, and differs between tenants and conversations. The texts are built by the client from the
arrival's ``group`` (tenant or conversation) and ``turn``: a recorded arrival sequence replays the
same prompts for every strategy, and an oracle can know which requests share which prefix.

A conversation's earlier answers are texts the client makes up, not what the model answered:
a real client sends back the model's answer, whose blocks TensorRT-LLM may still hold. Here only
the earlier prompts can be cached, which understates the reuse of real multi-turn traffic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from loadtests.traffic import WORDS

WorkloadKind = Literal["independent", "shared-prefix", "hot-tenant", "multi-turn"]
WORKLOADS: tuple[WorkloadKind, ...] = ("independent", "shared-prefix", "hot-tenant", "multi-turn")

SYSTEM_TOKENS_MULTI_TURN = 32
"""The system prompt every conversation starts with (``multi-turn``)."""


@dataclass(frozen=True)
class Workload:
    kind: WorkloadKind = "independent"
    tenants: int = 8
    prefix_tokens: int = 1024
    hot_share: float = 0.5
    sessions: int = 16
    turns: int = 6
    turn_tokens: int = 128

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {self.kind!r}")
        for name in ("tenants", "prefix_tokens", "sessions", "turns", "turn_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 < self.hot_share < 1.0:
            raise ValueError("hot_share must be in (0, 1)")
        if self.kind == "hot-tenant" and self.tenants < 2:
            raise ValueError("hot-tenant needs at least 2 tenants")

    @property
    def shares_prefixes(self) -> bool:
        return self.kind != "independent"

    def assigner(self, rng: random.Random) -> GroupAssigner:
        """The stream of (group, turn) for the arrivals, in order."""
        return GroupAssigner(self, rng)

    def shared_tokens(self, turn: int) -> int:
        """Tokens of the prompt a request shares with earlier ones of its group (besides the
        chat template's): a tenant's system prompt, or a conversation's first ``turn`` turns."""
        match self.kind:
            case "independent":
                return 0
            case "multi-turn":
                return SYSTEM_TOKENS_MULTI_TURN + 2 * turn * self.turn_tokens
            case _:
                return self.prefix_tokens

    def own_tokens(self, prompt_tokens: int) -> int:
        """Tokens of a request's own message: the arrival's, but ``turn_tokens`` for a
        conversation's turn (every message of a conversation has that length)."""
        return self.turn_tokens if self.kind == "multi-turn" else prompt_tokens

    def mean_shared_tokens(self) -> float:
        return (
            self.shared_tokens((self.turns - 1) / 2)
            if self.kind == "multi-turn"
            else float(self.shared_tokens(0))
        )

    def messages(
        self, group: int, turn: int, own_tokens: int, seed: int, index: int
    ) -> list[dict[str, str]]:
        """The chat messages of arrival ``index`` of a sequence recorded with ``seed``."""
        own = words(random.Random(f"{seed}-{index}"), own_tokens)  # no two alike
        match self.kind:
            case "independent":
                return [{"role": "user", "content": own}]
            case "multi-turn":  # the last turn's prompt, its answer, then this turn's message

                def said(k: int, role: str) -> dict[str, str]:
                    rng = random.Random(f"{seed}-session-{group}-{k}-{role}")
                    return {"role": role, "content": words(rng, self.turn_tokens)}

                system = words(random.Random(f"{seed}-system"), SYSTEM_TOKENS_MULTI_TURN)
                out = [{"role": "system", "content": system}]
                for k in range(turn):
                    out += [said(k, "user"), said(k, "assistant")]
                return [*out, said(turn, "user")]
            case _:
                system = words(random.Random(f"{seed}-tenant-{group}"), self.prefix_tokens)
                return [{"role": "system", "content": system}, {"role": "user", "content": own}]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("shared-prefix", "hot-tenant"):
            out |= {"tenants": self.tenants, "prefix_tokens": self.prefix_tokens}
        if self.kind == "hot-tenant":
            out["hot_share"] = self.hot_share
        if self.kind == "multi-turn":
            out |= {"sessions": self.sessions, "turns": self.turns, "turn_tokens": self.turn_tokens}
        return out


def words(rng: random.Random, tokens: int) -> str:
    """``tokens`` words drawn one by one from ``rng``: the text of fewer tokens from an equal
    ``rng`` is a prefix of it."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens)))


@dataclass
class GroupAssigner:
    """Gives each arrival its group (tenant or conversation) and turn."""

    workload: Workload
    rng: random.Random
    _open: list[list[int]] = field(default_factory=list)
    """multi-turn: [conversation id, next turn] per open conversation."""
    _next_session: int = 0

    def __call__(self) -> tuple[int, int]:
        w, rng = self.workload, self.rng
        match w.kind:
            case "independent":
                return -1, 0
            case "shared-prefix":
                return rng.randrange(w.tenants), 0
            case "hot-tenant":
                if rng.random() < w.hot_share:
                    return 0, 0
                return 1 + rng.randrange(w.tenants - 1), 0
            case "multi-turn":
                while len(self._open) < w.sessions:
                    self._open.append([self._next_session, 0])
                    self._next_session += 1
                slot = self._open[rng.randrange(len(self._open))]
                session, turn = slot
                slot[1] += 1
                if slot[1] >= w.turns:
                    self._open.remove(slot)
                return session, turn
        raise AssertionError(w.kind)


class WorkloadSettings(BaseModel):
    """The workload's settings, shared by ``triage bench compare`` and Locust (each settings
    class inherits them, under its own env prefix)."""

    workload: WorkloadKind = Field(
        default="independent",
        description="what the prompts share (loadtests/workloads.py): independent, "
        "shared-prefix, hot-tenant, multi-turn",
    )
    tenants: int = Field(default=12, ge=1, description="shared-prefix, hot-tenant: tenants")
    prefix_tokens: int = Field(default=1024, ge=1, description="a tenant's system prompt")
    hot_share: float = Field(default=0.5, gt=0, lt=1, description="hot-tenant: tenant 0's share")
    sessions: int = Field(default=16, ge=1, description="multi-turn: conversations open at once")
    turns: int = Field(default=6, ge=1, description="multi-turn: turns per conversation")
    turn_tokens: int = Field(default=128, ge=1, description="multi-turn: tokens per earlier turn")

    def workload_shape(self) -> Workload:
        return Workload(
            kind=self.workload,
            tenants=self.tenants,
            prefix_tokens=self.prefix_tokens,
            hot_share=self.hot_share,
            sessions=self.sessions,
            turns=self.turns,
            turn_tokens=self.turn_tokens,
        )
