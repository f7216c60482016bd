"""``FrontDoor``: an ASGI layer around LiteLLM's proxy app that answers what it can before
LiteLLM spends its per-request work (body parsing, authentication, logging set-up, ~30 ms of
CPU each), and cancels a request whose client went away.

Per HTTP request, in order:

1. **Body size** (every route): a ``Content-Length`` over ``max_body_mb`` is answered 413 before
   a byte is read; a body without one is counted as it streams in and refused the moment it
   passes the limit, so memory stays bounded whatever the client sends.
2. **Validation** (``POST`` chat completions and completions): the body is read once and
   checked by ``validation.check_request``; a bad body is answered 400 with OpenAI's envelope
   naming the field. LiteLLM gets the same bytes.
3. **Shedding**: when the admission plugin's memo already says a request of this model and
   this key's priority would be shed, the 503 (same envelope, ``Retry-After``,
   ``retry-after-ms``) goes out at once. Only for keys this process has authenticated within
   the key cache's TTL (``ProxySide.shed``): an unknown key goes through LiteLLM's
   authentication as always, so nothing reaches a replica unauthenticated.
4. **Disconnects**: the request runs in a task of its own while the front door listens to the
   connection; when the client goes away before the answer is complete, the task is
   cancelled (the provider closes its upstream call, so the replica stops generating) and what
   the request held (admission ticket, routing reservation) is given back
   (``ProxySide.request_ended``). The request's ``x-litellm-call-id`` (LiteLLM's call id, the
   admission ticket) is set by the front door so that it knows which request that is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugins.front_door import metrics
from plugins.front_door.settings import FrontDoorSettings
from plugins.front_door.validation import Endpoint, Rejected, check_request

log = logging.getLogger(__name__)

CALL_ID_HEADER = b"x-litellm-call-id"
ROUTES = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/completions": Endpoint.COMPLETIONS,
}


@dataclass(frozen=True)
class Answer:
    """A response the front door sends itself."""

    status: int
    payload: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class ProxySide(Protocol):
    """What the front door asks of the proxy process it runs in (``proxy_side.py``)."""

    def max_tokens_limit(self, model: str) -> int: ...

    def shed(self, authorization: str | None, model: str) -> Answer | None: ...

    def request_ended(self, call_id: str) -> None: ...


def error_answer(
    status: int, message: str, type_: str, param: str | None, code: str, **headers: str
) -> Answer:
    return Answer(
        status,
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        tuple(headers.items()),
    )


def bad_request(problem: Rejected) -> Answer:
    return error_answer(400, problem.message, "invalid_request_error", problem.param, problem.code)


def too_large(limit_mb: float) -> Answer:
    return error_answer(
        413,
        f"the request body is larger than this gateway accepts ({limit_mb:g} MB)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def send_answer(send: Send, answer: Answer) -> None:
    body = json.dumps(answer.payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in answer.headers),
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _with_header(headers: Iterable[tuple[bytes, bytes]], name: bytes, value: bytes) -> list[Any]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


class FrontDoor:
    def __init__(
        self,
        app: ASGIApp,
        settings: FrontDoorSettings,
        proxy: ProxySide,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.settings = settings
        self.proxy = proxy
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            metrics.REJECTED.labels("request_too_large").inc()
            await send_answer(send, too_large(self.settings.max_body_mb))
            return
        endpoint = ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
        if endpoint is None:
            await self._pass_limited(scope, receive, send)
            return
        started = self._clock()
        try:
            body = await self._read_body(receive, limit)
        except BodyTooLarge:
            metrics.REJECTED.labels("request_too_large").inc()
            await send_answer(send, too_large(self.settings.max_body_mb))
            return
        except ClientGone:
            return
        checked = check_request(endpoint, body, self.proxy.max_tokens_limit)
        if isinstance(checked, Rejected):
            metrics.REJECTED.labels(checked.code).inc()
            log.info(
                "front door: 400 on %s: %s (param %s)", scope["path"], checked.code, checked.param
            )
            await send_answer(send, bad_request(checked))
            return
        if self.settings.shed:
            authorization = _header(scope, b"authorization")
            shed = self.proxy.shed(
                authorization.decode("latin-1") if authorization else None, checked.model
            )
            if shed is not None:
                metrics.REJECTED.labels("shed").inc()
                metrics.DECISION.observe(self._clock() - started)
                await send_answer(send, shed)
                return
        call_id = str(uuid.uuid4())
        inner = dict(scope)
        inner["headers"] = _with_header(
            scope.get("headers") or (), CALL_ID_HEADER, call_id.encode()
        )
        await self._run(inner, body, receive, send, call_id)

    async def _read_body(self, receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _pass_limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other route: LiteLLM reads the body itself, counted against the limit."""
        limit = self.settings.max_body_bytes
        size = 0
        started = False

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if started:
                raise
            metrics.REJECTED.labels("request_too_large").inc()
            await send_answer(send, too_large(self.settings.max_body_mb))

    async def _run(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, call_id: str
    ) -> None:
        """Run LiteLLM's app on the buffered body; cancel it when the client goes away first."""
        gone = asyncio.Event()
        complete = False
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sending(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, replay, sending))

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not complete and self.settings.cancel_on_disconnect:
                        task.cancel()
                    return

        listener = asyncio.ensure_future(listen())
        try:
            await task
        except asyncio.CancelledError:
            if not gone.is_set() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the server cancelled us (shutdown), not the client
        finally:
            listener.cancel()
            if gone.is_set() and not complete:
                metrics.CANCELLED.inc()
                log.info("front door: client went away, request %s cancelled", call_id)
                self.proxy.request_ended(call_id)
