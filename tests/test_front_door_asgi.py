"""The front door as an ASGI layer (``plugins/front_door/door.py``), driven with ASGI messages:
an inner app that stands in for LiteLLM's (this is about the layer's own behaviour: limits,
the pipeline, disconnects) and a ``ProxySide`` that records what it is told. The same layer in
front of the real proxy: ``test_front_door_proxy.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from plugins.front_door.door import Answer, FrontDoor, error_answer
from plugins.front_door.settings import FrontDoorSettings
from plugins.front_door.validation import Accepted, Rejected

CHAT = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
).encode()


@dataclass
class Side:
    """A ``ProxySide`` that lets everything in (or answers ``early``) and records."""

    early: Answer | None = None
    late: Answer | None = None
    let_in_calls: list[str] = field(default_factory=list)
    gates: dict[str, Callable[[], None]] = field(default_factory=dict)
    finished_calls: list[tuple[str, bool]] = field(default_factory=list)

    def max_tokens_limit(self, model: str) -> int:
        return 100

    def body_problem(self, accepted: Accepted, path: str) -> Rejected | None:
        if "api_base" in accepted.data:
            return Rejected("api_base is not allowed", None, "param_not_allowed")
        return None

    def let_in(
        self, authorization: str | None, model: str, call_id: str, reached_gate: Callable[[], None]
    ) -> Answer | None:
        self.let_in_calls.append(call_id)
        self.gates[call_id] = reached_gate
        return self.early

    def recheck(self, model: str, call_id: str) -> Answer | None:
        return self.late

    def finished(self, call_id: str, abandoned: bool) -> None:
        self.finished_calls.append((call_id, abandoned))


@dataclass
class Inner:
    """Stands in for LiteLLM's app: reads the body, remembers the call id, then waits for
    ``release`` (or forever) before answering 200."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    bodies: list[bytes] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        self.call_ids.append(headers.get(b"x-litellm-call-id", b"").decode())
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise OSError("client disconnected")  # as Starlette's ClientDisconnect
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


@dataclass
class Client:
    """One HTTP request as the server hands it to the app: its body in chunks, then (when
    told) a disconnect."""

    chunks: list[bytes]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    path: str = "/v1/chat/completions"
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def scope(self, content_length: int | None = None) -> dict[str, Any]:
        headers = list(self.headers)
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        return {"type": "http", "method": "POST", "path": self.path, "headers": headers}

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def payload(self) -> dict[str, Any]:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return json.loads(body)


def door(inner: Any, side: Side, **settings: Any) -> FrontDoor:
    return FrontDoor(inner, FrontDoorSettings(**settings), side)


async def test_a_declared_body_over_the_limit_is_refused_before_any_byte_is_read() -> None:
    inner, side = Inner(), Side()
    client = Client([b"x" * 10])
    await door(inner, side, max_body_mb=1)(
        client.scope(200 * 1024 * 1024), client.receive, client.send
    )
    assert client.status == 413
    assert client.payload["error"]["code"] == "request_too_large"
    assert client.chunks == [b"x" * 10]  # not read
    assert inner.bodies == [] and side.let_in_calls == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_a_streamed_body_is_cut_off_at_the_limit(path: str) -> None:
    inner, side = Inner(), Side()
    chunk = b"x" * (256 * 1024)
    client = Client([chunk] * 12, path=path)  # 3 MB, no Content-Length
    await door(inner, side, max_body_mb=1)(client.scope(), client.receive, client.send)
    assert client.status == 413
    assert len(client.chunks) == 12 - 5  # stopped at the first chunk past 1 MB
    assert inner.bodies == []


async def test_a_bad_body_gets_400_and_never_reaches_litellm() -> None:
    inner, side = Inner(), Side()
    client = Client([b"[1, 2]"])
    await door(inner, side)(client.scope(), client.receive, client.send)
    assert client.status == 400
    error = client.payload["error"]
    assert error == {
        "message": "the request body must be a JSON object, not an array",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_type",
    }
    assert inner.bodies == [] and side.let_in_calls == []


async def test_litellm_gets_the_same_bytes_and_a_unique_call_id_keeping_the_clients() -> None:
    inner, side = Inner(), Side()
    inner.release.set()
    front = door(inner, side)
    mine = Client([CHAT[:10], CHAT[10:]], headers=[(b"x-litellm-call-id", b"trace-7")])
    other = Client([CHAT], headers=[(b"x-litellm-call-id", b"trace-7")])
    await front(mine.scope(), mine.receive, mine.send)
    await front(other.scope(), other.receive, other.send)
    assert mine.status == other.status == 200
    assert inner.bodies == [CHAT, CHAT]
    first, second = inner.call_ids
    assert first.startswith("trace-7.") and second.startswith("trace-7.") and first != second
    assert [c for c, _ in side.finished_calls] == [first, second]
    assert side.finished_calls == [(first, False), (second, False)]


async def test_an_early_answer_is_sent_without_litellm() -> None:
    inner = Inner()
    side = Side(
        early=error_answer(
            503, "full", "service_unavailable", None, "queue_full", **{"Retry-After": "3"}
        )
    )
    client = Client([CHAT])
    await door(inner, side)(client.scope(), client.receive, client.send)
    assert client.status == 503 and client.payload["error"]["code"] == "queue_full"
    assert (b"retry-after", b"3") in client.sent[0]["headers"]
    assert inner.bodies == []
    assert side.finished_calls == [(side.let_in_calls[0], False)]  # its arrival is forgotten


async def test_a_client_that_goes_away_cancels_its_request_and_gives_it_back() -> None:
    inner, side = Inner(), Side()
    client = Client([CHAT])
    task = asyncio.create_task(door(inner, side)(client.scope(), client.receive, client.send))
    await asyncio.wait_for(inner.started.wait(), 1.0)
    client.gone.set()
    await asyncio.wait_for(task, 1.0)  # returns (the app was cancelled, not the server)
    assert inner.cancelled == 1
    assert side.finished_calls == [(inner.call_ids[0], True)]
    assert client.sent == []


async def test_a_disconnect_after_the_answer_cancels_nothing() -> None:
    inner, side = Inner(), Side()
    inner.release.set()
    client = Client([CHAT])
    client.gone.set()  # the connection closes right after the answer
    await door(inner, side)(client.scope(), client.receive, client.send)
    assert client.status == 200 and inner.cancelled == 0
    assert side.finished_calls == [(inner.call_ids[0], False)]


async def test_the_server_cancelling_the_request_propagates() -> None:
    inner, side = Inner(), Side()
    client = Client([CHAT])
    task = asyncio.create_task(door(inner, side)(client.scope(), client.receive, client.send))
    await asyncio.wait_for(inner.started.wait(), 1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert side.finished_calls == [(inner.call_ids[0], False)]


async def test_the_pipeline_holds_requests_until_the_ones_before_reach_the_gate() -> None:
    inner, side = Inner(), Side()
    front = door(inner, side, pipeline_size=1)
    clients = [Client([CHAT]) for _ in range(3)]
    tasks = [asyncio.create_task(front(c.scope(), c.receive, c.send)) for c in clients]
    await asyncio.wait_for(inner.started.wait(), 1.0)
    await asyncio.sleep(0.05)
    assert len(inner.bodies) == 1 and len(side.let_in_calls) == 3  # all judged at arrival
    side.late = error_answer(503, "full", "service_unavailable", None, "queue_full")
    side.gates[side.let_in_calls[0]]()  # the first reached the gate: the next is judged again
    for task in tasks[1:]:
        await asyncio.wait_for(task, 1.0)
    assert [c.status for c in clients[1:]] == [503, 503]
    assert len(inner.bodies) == 1  # the rest never entered LiteLLM
    inner.release.set()
    await asyncio.wait_for(tasks[0], 1.0)
    assert clients[0].status == 200
    assert front.pipeline.held == 0


async def test_a_route_without_a_gate_frees_its_slot_after_hold_max() -> None:
    inner, side = Inner(), Side()
    front = door(inner, side, pipeline_size=1, pipeline_hold_max_ms=50)
    first, second = Client([CHAT]), Client([CHAT])
    one = asyncio.create_task(front(first.scope(), first.receive, first.send))
    await asyncio.wait_for(inner.started.wait(), 1.0)
    two = asyncio.create_task(front(second.scope(), second.receive, second.send))
    await asyncio.sleep(0.2)
    assert len(inner.bodies) == 2  # the first never reached a gate: its slot was freed
    inner.release.set()
    await asyncio.wait_for(asyncio.gather(one, two), 1.0)


async def test_a_body_the_proxy_refuses_gets_400_before_litellm() -> None:
    inner, side = Inner(), Side()
    body = json.dumps({**json.loads(CHAT), "api_base": "http://evil"}).encode()
    client = Client([body])
    await door(inner, side)(client.scope(), client.receive, client.send)
    assert client.status == 400 and client.payload["error"]["code"] == "param_not_allowed"
    assert inner.bodies == []


async def test_an_emptied_internal_header_is_dropped() -> None:
    async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"x-litellm-model-api-base", b""), (b"x-litellm-model-id", b"replica-0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    client = Client([CHAT])
    await door(answer, Side())(client.scope(), client.receive, client.send)
    assert client.sent[0]["headers"] == [(b"x-litellm-model-id", b"replica-0")]


async def test_an_exception_that_escapes_the_proxy_is_a_500_with_the_openai_envelope() -> None:
    """An exception that escapes LiteLLM's handlers (seen once under a Redis outage: a
    MemoryError in LiteLLM's auth, then LiteLLM's own handler failing on ``import prisma``)
    reached the client as uvicorn's plain-text ``Internal Server Error``: now the OpenAI
    envelope, and the exception still propagates to the server, which logs it."""

    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        raise MemoryError("contextvars")

    client = Client([CHAT])
    with pytest.raises(MemoryError):
        await door(failing, Side())(client.scope(), client.receive, client.send)
    assert client.status == 500
    assert dict(client.sent[0]["headers"])[b"content-type"] == b"application/json"
    assert client.payload["error"]["type"] == "internal_server_error"
    assert client.payload["error"]["code"] == "internal_error"
    assert sum(m["type"] == "http.response.start" for m in client.sent) == 1


async def test_a_500_the_proxy_answers_itself_goes_through_unchanged() -> None:
    """Only Starlette's plain-text fallback is replaced: LiteLLM's own 500s keep their body."""

    async def own_500(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        body = b'{"error": {"message": "upstream broke", "type": "api_error"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    client = Client([CHAT])
    await door(own_500, Side())(client.scope(), client.receive, client.send)
    assert client.status == 500 and client.payload["error"]["message"] == "upstream broke"
