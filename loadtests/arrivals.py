"""A recorded arrival sequence: Poisson arrival times with each request's lengths, mode and
place in its workload (tenant or conversation, ``workloads.py``), made once from a seed, saved as
JSON and replayed open-loop for every strategy (``triage bench``)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from loadtests.traffic import LengthDist
from loadtests.workloads import Workload

FORMAT = "triage-arrivals/1"


@dataclass(frozen=True)
class Arrival:
    t: float
    """Seconds from the start of the replay."""
    prompt_tokens: int
    """Tokens of its own user message (besides what it shares with its group)."""
    max_tokens: int
    stream: bool
    group: int = -1
    """Its tenant or conversation (``Workload.messages``); -1: it shares nothing."""
    turn: int = 0
    """multi-turn: the turns of its conversation before it."""


@dataclass
class ArrivalSequence:
    rate_rps: float
    seconds: float
    seed: int
    prompt: str
    output: str
    stream_fraction: float
    arrivals: list[Arrival] = field(default_factory=list)
    workload: Workload = field(default_factory=Workload)
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form context (load fraction, capacity) kept with the file."""

    @classmethod
    def poisson(
        cls,
        rate_rps: float,
        seconds: float,
        seed: int,
        prompt: LengthDist | str,
        output: LengthDist | str,
        stream_fraction: float,
        meta: dict[str, Any] | None = None,
        workload: Workload | None = None,
    ) -> ArrivalSequence:
        """Exponential gaps of mean ``1 / rate_rps`` within ``[0, seconds)``. Times and request
        attributes come from separate random streams of ``seed``: the same seed gives the same
        times whatever the length distributions."""
        if rate_rps <= 0 or seconds <= 0:
            raise ValueError("rate_rps and seconds must be > 0")
        if not 0 <= stream_fraction <= 1:
            raise ValueError("stream_fraction must be in [0, 1]")
        prompt_dist, output_dist = LengthDist.parse(prompt), LengthDist.parse(output)
        work = workload if workload is not None else Workload()
        times = random.Random(seed)
        attrs = random.Random(f"attributes-{seed}")
        assign = work.assigner(random.Random(f"groups-{seed}"))
        arrivals: list[Arrival] = []
        t = times.expovariate(rate_rps)
        while t < seconds:
            group, turn = assign()
            arrivals.append(
                Arrival(
                    t=round(t, 6),
                    prompt_tokens=prompt_dist.sample(attrs),
                    max_tokens=output_dist.sample(attrs),
                    stream=attrs.random() < stream_fraction,
                    group=group,
                    turn=turn,
                )
            )
            t += times.expovariate(rate_rps)
        return cls(
            rate_rps=rate_rps,
            seconds=seconds,
            seed=seed,
            prompt=str(prompt_dist),
            output=str(output_dist),
            stream_fraction=stream_fraction,
            arrivals=arrivals,
            workload=work,
            meta=dict(meta or {}),
        )

    def messages(self, index: int) -> list[dict[str, str]]:
        """The chat messages of arrival ``index``."""
        a = self.arrivals[index]
        return self.workload.messages(a.group, a.turn, a.prompt_tokens, self.seed, index)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["format"] = FORMAT
        # compact rows: [t, prompt_tokens, max_tokens, stream, group, turn]
        doc["arrivals"] = [
            [a.t, a.prompt_tokens, a.max_tokens, int(a.stream), a.group, a.turn]
            for a in self.arrivals
        ]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ArrivalSequence:
        if doc.get("format") != FORMAT:
            raise ValueError(f"not an arrival sequence ({FORMAT}): format={doc.get('format')!r}")
        rows = doc["arrivals"]
        arrivals = [  # rows of files recorded before workloads have 4 columns
            Arrival(float(r[0]), int(r[1]), int(r[2]), bool(r[3]), *(int(x) for x in r[4:6]))
            for r in rows
        ]
        if any(b.t < a.t for a, b in pairwise(arrivals)):
            raise ValueError("arrival times must not decrease")
        return cls(
            rate_rps=float(doc["rate_rps"]),
            seconds=float(doc["seconds"]),
            seed=int(doc["seed"]),
            prompt=str(doc["prompt"]),
            output=str(doc["output"]),
            stream_fraction=float(doc["stream_fraction"]),
            arrivals=arrivals,
            workload=Workload(**(doc.get("workload") or {})),
            meta=dict(doc.get("meta") or {}),
        )

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: Path) -> ArrivalSequence:
        return cls.from_json(json.loads(path.read_text()))
