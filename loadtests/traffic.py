"""What the load generators send: length distributions, keys with priority tiers, fleet capacity,
and how to read the answers (Retry-After, the OpenAI error envelope, SSE chunks).

Pure and importable anywhere: no Locust (it monkey-patches at import), no LiteLLM.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

# the stand-in's tokenizer counts words and punctuation marks: one word = one prompt token
WORDS = (
    "the fleet routes each request to the replica that will finish it first while the gateway "
    "keeps the queue short and answers overflow at once with a retry hint for the client"
).split()

DistKind = Literal["fixed", "uniform", "normal", "lognormal", "exp", "choice"]
_DIST_RE = re.compile(r"^\s*(?P<kind>[a-z]+)\s*:\s*(?P<args>[^;]*?)\s*(?:;(?P<opts>.*))?$")
MAX_TOKENS = 32768


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, written ``kind:args[;min=N;max=N]``:

    ``fixed:25`` · ``uniform:16,64`` (inclusive) · ``normal:MEAN,SD`` · ``lognormal:MEDIAN,SIGMA``
    · ``exp:MEAN`` · ``choice:16,64,256`` (equal weights). Samples are rounded and clipped to
    ``[min, max]`` (default 1 .. 32768).
    """

    kind: DistKind
    args: tuple[float, ...]
    low: int = 1
    high: int = MAX_TOKENS

    @classmethod
    def parse(cls, spec: str | LengthDist) -> LengthDist:
        if isinstance(spec, LengthDist):
            return spec
        match = _DIST_RE.match(str(spec))
        if match is None:
            raise ValueError(f"length distribution {spec!r}: expected kind:args, e.g. fixed:25")
        kind = match["kind"]
        try:
            args = tuple(float(a) for a in match["args"].split(",") if a.strip())
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: arguments must be numbers") from None
        low, high = 1, MAX_TOKENS
        for opt in (match["opts"] or "").split(";"):
            if not opt.strip():
                continue
            name, _, value = opt.partition("=")
            if name.strip() not in ("min", "max") or not value.strip().isdigit():
                raise ValueError(f"length distribution {spec!r}: options are min=N and max=N")
            if name.strip() == "min":
                low = int(value)
            else:
                high = int(value)
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exp": 1}
        if kind not in (*arity, "choice"):
            raise ValueError(
                f"length distribution {spec!r}: kind must be one of "
                "fixed, uniform, normal, lognormal, exp, choice"
            )
        if kind in arity and len(args) != arity[kind]:
            raise ValueError(f"length distribution {spec!r}: {kind} takes {arity[kind]} numbers")
        if kind == "choice" and not args:
            raise ValueError(f"length distribution {spec!r}: choice needs at least one value")
        if any(not math.isfinite(a) or a < 0 for a in args):
            raise ValueError(f"length distribution {spec!r}: numbers must be finite and >= 0")
        if kind == "uniform" and args[0] > args[1]:
            raise ValueError(f"length distribution {spec!r}: uniform needs low <= high")
        if kind in ("exp", "lognormal") and args[0] <= 0:
            raise ValueError(f"length distribution {spec!r}: {kind} needs a positive scale")
        if not 1 <= low <= high <= MAX_TOKENS:
            raise ValueError(f"length distribution {spec!r}: need 1 <= min <= max <= {MAX_TOKENS}")
        return cls(kind, args, low, high)  # type: ignore[arg-type]

    def __str__(self) -> str:
        args = ",".join(f"{a:g}" for a in self.args)
        opts = "".join(
            f";{k}={v}"
            for k, v, d in (("min", self.low, 1), ("max", self.high, MAX_TOKENS))
            if v != d
        )
        return f"{self.kind}:{args}{opts}"

    def sample(self, rng: random.Random) -> int:
        a = self.args
        match self.kind:
            case "fixed":
                value = a[0]
            case "uniform":
                value = rng.randint(math.ceil(a[0]), math.floor(a[1]))
            case "normal":
                value = rng.gauss(a[0], a[1])
            case "lognormal":
                value = a[0] * math.exp(rng.gauss(0.0, a[1]))
            case "exp":
                value = rng.expovariate(1.0 / a[0])
            case "choice":
                value = rng.choice(a)
        return min(self.high, max(self.low, round(value)))

    def upper(self) -> float:
        """A length few samples exceed: the largest for fixed, uniform and choice; mean + 3 SD
        (normal), median x e^(3 sigma) (lognormal), mean x ln 1000 (exp: 1 in 1000 longer);
        clipped to ``[min, max]``."""
        a = self.args
        match self.kind:
            case "fixed":
                value = a[0]
            case "uniform":
                value = math.floor(a[1])
            case "choice":
                value = max(a)
            case "normal":
                value = a[0] + 3 * a[1]
            case "lognormal":
                value = a[0] * math.exp(3 * a[1])
            case "exp":
                value = a[0] * math.log(1000)
        return float(min(self.high, max(self.low, value)))

    def mean(self) -> float:
        """The mean before clipping (clipping moves it little for sensible specs)."""
        a = self.args
        match self.kind:
            case "fixed":
                value = a[0]
            case "uniform":
                value = (math.ceil(a[0]) + math.floor(a[1])) / 2
            case "normal" | "exp":
                value = a[0]
            case "lognormal":
                value = a[0] * math.exp(a[1] ** 2 / 2)
            case "choice":
                value = sum(a) / len(a)
        return float(min(self.high, max(self.low, value)))


def prompt_text(tokens: int, rng: random.Random) -> str:
    """A prompt the stand-in counts as ``tokens`` tokens (words; no punctuation)."""
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(max(1, tokens)))


# -- keys and priority tiers ----------------------------------------------------------------------


class KeyTier(BaseModel):
    """One virtual key of the load: its admission ``priority`` (0 first), how many of the users
    use it (``weight``), and a label for the report (``tier``)."""

    key: str = Field(min_length=1)
    priority: int = Field(default=1, ge=0, le=9)
    weight: float = Field(default=1.0, gt=0)
    tier: str = Field(default="", description="label in the report; default p<priority>")

    def label(self) -> str:
        return self.tier or f"p{self.priority}"


def load_keys(path: Path) -> list[KeyTier]:
    """A keys file: a JSON list of ``{"key", "priority", "weight", "tier"}`` objects."""
    raw = json.loads(path.read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of keys")
    return [KeyTier.model_validate(item) for item in raw]


def pick_key(keys: Sequence[KeyTier], rng: random.Random) -> KeyTier:
    """A key drawn by weight."""
    return rng.choices(list(keys), weights=[k.weight for k in keys], k=1)[0]


# -- capacity of a stand-in fleet -----------------------------------------------------------------


@dataclass(frozen=True)
class StandinTiming:
    """The stand-in's timing knobs (``triton_models/README.md``), as ``stack.json`` has them."""

    max_active: int = 4
    decode_ms_per_token: float = 20.0
    batch_slowdown: float = 0.05
    prefill_ms_per_token: float = 0.2

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StandinTiming:
        names = ("max_active", "decode_ms_per_token", "batch_slowdown", "prefill_ms_per_token")
        return cls(**{k: data[k] for k in names if k in data})

    def step_s(self, active: int, speed: float = 1.0) -> float:
        """One engine iteration with ``active`` sequences (decode only)."""
        return self.decode_ms_per_token * (1 + self.batch_slowdown * (active - 1)) / speed / 1000

    def service_s(
        self, output_tokens: float, prompt_tokens: float = 0.0, speed: float = 1.0
    ) -> float:
        """One request's time from admission to its last token in a full batch."""
        prefill = self.prefill_ms_per_token * prompt_tokens / speed / 1000
        return output_tokens * self.step_s(self.max_active, speed) + prefill

    def replica_rps(self, output_tokens: float, prompt_tokens: float, speed: float) -> float:
        """Completions per second of one replica kept full: ``max_active`` sequences share each
        decode step; each admission stalls the batch for its prefill."""
        per_request_s = (
            output_tokens * self.step_s(self.max_active, speed) / self.max_active
            + self.prefill_ms_per_token * prompt_tokens / speed / 1000
        )
        return 1.0 / per_request_s

    def fleet_rps(
        self, speeds: Sequence[float], output_tokens: float, prompt_tokens: float
    ) -> float:
        return sum(self.replica_rps(output_tokens, prompt_tokens, s) for s in speeds)


# -- reading the answers --------------------------------------------------------------------------


def retry_after_s(headers: Mapping[str, str], now_epoch: float | None = None) -> float | None:
    """The wait a 503/429 asks for: ``retry-after-ms`` if present, else ``Retry-After`` (seconds
    or an HTTP date); None when neither parses. Header names are matched case-insensitively."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    seconds = lowered.get("retry-after")
    if seconds is None:
        return None
    try:
        value = float(seconds)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(seconds)
    except (TypeError, ValueError):
        return None
    if now_epoch is None:
        import time

        now_epoch = time.time()
    return max(0.0, when.timestamp() - now_epoch)


def openai_error(body: Any) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI error envelope ``{"error": {"message": ...}}``, else
    None. ``body`` may be bytes, text or parsed JSON."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error
    return None


@dataclass(frozen=True)
class SseEvent:
    """One ``data:`` line of an OpenAI chat-completions stream."""

    done: bool = False
    content: str = ""
    """The delta's text (empty for role-only or final chunks)."""
    error: dict[str, Any] | None = None
    completion_tokens: int | None = None
    """From a usage chunk, when the server sends one."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """From the usage chunk: its prompt tokens and ``prompt_tokens_details.cached_tokens``."""


def prompt_usage(usage: Any) -> tuple[int, int]:
    """A usage object's prompt tokens and the cached ones among them (0 when absent)."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (
        prompt if isinstance(prompt, int) else 0,
        cached if isinstance(cached, int) else 0,
    )


def parse_sse_line(line: bytes | str) -> SseEvent | None:
    """An SSE line as an event; None for blank lines, comments and other fields. A ``data:``
    line that is not JSON is reported as an error event (a malformed stream)."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes | bytearray) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == "[DONE]":
        return SseEvent(done=True)
    try:
        chunk = json.loads(data)
    except ValueError:
        return SseEvent(error={"message": f"malformed SSE data: {data[:80]!r}", "type": "client"})
    error = openai_error(chunk)
    if error is not None:
        return SseEvent(error=error)
    if not isinstance(chunk, dict):
        return SseEvent(error={"message": "SSE data is not an object", "type": "client"})
    content = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        piece = delta.get("content")
        if isinstance(piece, str):
            content += piece
    usage = chunk.get("usage") or {}
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    prompt, cached = prompt_usage(usage)
    return SseEvent(
        content=content,
        completion_tokens=tokens if isinstance(tokens, int) else None,
        prompt_tokens=prompt,
        cached_tokens=cached,
    )


AttemptOutcome = Literal["ok", "shed", "error", "lost"]


@dataclass(slots=True)
class Attempt:
    """What one HTTP attempt got (retries are the caller's): the outcome and what it carried."""

    outcome: AttemptOutcome
    status: int
    replica: str | None = None
    detail: str = ""
    """Error code / kind, for the report ("" for a success)."""
    ttft_s: float | None = None
    tokens: int = 0
    retry_after_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the replica found in its KV cache (usage.prompt_tokens_details)."""


def refusal(status: int, replica: str | None, body: Any, headers: Mapping[str, str]) -> Attempt:
    """A non-200 answer: ``shed`` (429/503 with the OpenAI error envelope), ``error`` (another
    status with it), ``lost`` (no envelope: not an answer a client can act on)."""
    envelope = openai_error(body)
    if envelope is None:
        return Attempt("lost", status, replica, f"HTTP {status} malformed")
    code = str(envelope.get("code") or envelope.get("type") or status)
    if status in (429, 503):
        return Attempt("shed", status, replica, f"{status} {code}", None, 0, retry_after_s(headers))
    return Attempt("error", status, replica, f"{status} {code}")


def completion(status: int, replica: str | None, body: bytes | str) -> Attempt:
    """A 200 non-stream answer: ``ok`` with its usage's completion tokens, or ``lost`` when it
    holds no message content."""
    try:
        data = json.loads(body or b"")
        choices = data.get("choices") or []
        if not choices or choices[0].get("message", {}).get("content") is None:
            raise ValueError("no choices")
    except (ValueError, AttributeError):
        return Attempt("lost", status, replica, "malformed completion")
    usage = data.get("usage") or {}
    prompt, cached = prompt_usage(usage)
    return Attempt(
        "ok",
        status,
        replica,
        tokens=int(usage.get("completion_tokens") or 0),
        prompt_tokens=prompt,
        cached_tokens=cached,
    )


class StreamReading:
    """A 200 stream, line by line: ``line`` returns the attempt once the stream has ended (an
    error event, or ``[DONE]``: ``ok`` with the usage's tokens, else the content chunks; ``lost``
    without content); ``cut_short`` when the connection ended first."""

    def __init__(self, status: int, replica: str | None, started: float) -> None:
        self.status, self.replica, self.started = status, replica, started
        self.ttft_s: float | None = None
        self.chunks = 0
        self.usage: int | None = None
        self.prompt_tokens = self.cached_tokens = 0

    def line(self, raw: bytes | str, now: float) -> Attempt | None:
        event = parse_sse_line(raw)
        if event is None:
            return None
        if event.error is not None:
            code = str(event.error.get("code") or event.error.get("type") or "error")
            return self._end("error", f"stream {code}")
        if event.done:
            if self.ttft_s is None:
                return self._end("lost", "empty stream")
            return self._end("ok", "", tokens=self.usage or self.chunks)
        if event.content:
            self.chunks += 1
            if self.ttft_s is None:
                self.ttft_s = now - self.started
        if event.completion_tokens is not None:
            self.usage = event.completion_tokens
            self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.cached_tokens
        return None

    def cut_short(self, detail: str = "stream truncated") -> Attempt:
        return self._end("lost", detail)

    def _end(self, outcome: AttemptOutcome, detail: str, tokens: int | None = None) -> Attempt:
        return Attempt(
            outcome,
            self.status,
            self.replica,
            detail,
            self.ttft_s,
            self.chunks if tokens is None else tokens,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
        )
