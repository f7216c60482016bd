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
3. **Shedding at arrival** (``ProxySide.let_in``): a key this process knows to be bad gets its
   401 here; a request that the admission plugin can already tell would be shed (its shed memo,
   or a burst larger than the whole fleet's capacity and queue) gets the same 503 as the gate's
   (envelope, ``Retry-After``, ``retry-after-ms``) at once. Only for keys this process has
   authenticated before: an unknown key goes through LiteLLM's authentication as always, so
   nothing reaches a replica unauthenticated.
4. **Pipeline**: at most ``pipeline_size`` requests at once go on into LiteLLM towards the
   admission gate (``Pipeline``); the rest wait their turn here, and are judged again
   (``ProxySide.recheck``) when it comes.
5. **Disconnects**: the request runs in a task of its own while the front door listens to the
   connection; when the client goes away before the answer is complete, the task is
   cancelled (the provider closes its upstream call, so the replica stops generating) and what
   the request held (admission ticket, routing reservation) is given back
   (``ProxySide.finished``). The request's ``x-litellm-call-id`` (LiteLLM's call id, the
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
from functools import partial
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugins.front_door import metrics
from plugins.front_door.settings import FrontDoorSettings
from plugins.front_door.validation import Accepted, Endpoint, Rejected, check_request

log = logging.getLogger(__name__)

CALL_ID_HEADER = b"x-litellm-call-id"
MAX_CLIENT_CALL_ID = 200
"""LiteLLM takes call ids up to 256 characters (``MAX_LITELLM_CALL_ID_LENGTH``); a client's
longer one is replaced, not extended."""
ROUTES = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/completions": Endpoint.COMPLETIONS,
    "/v1/messages": Endpoint.MESSAGES,
}
INTERNAL_HEADERS = frozenset({b"x-litellm-model-api-base"})
"""Response headers that name a replica's address: dropped when empty (the auth plugin empties
them for every key but the master key; an empty header still tells what the gateway runs)."""


@dataclass(frozen=True)
class Answer:
    """A response the front door sends itself."""

    status: int
    payload: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class ProxySide(Protocol):
    """What the front door asks of the proxy process it runs in (``proxy_side.py``)."""

    def max_tokens_limit(self, model: str) -> int: ...

    def body_problem(self, accepted: Accepted, path: str) -> Rejected | None:
        """A body the proxy's own rules refuse (LiteLLM's ``is_request_body_safe``: no
        ``api_base``, credentials or callbacks from clients), as a 400."""
        ...

    def let_in(
        self,
        authorization: str | None,
        model: str,
        call_id: str,
        reached_gate: Callable[[], None],
    ) -> Answer | None:
        """At arrival. None: the request goes on to LiteLLM (as ``call_id``; ``reached_gate``
        is called when it reaches the admission gate); else the answer it gets now (401 for a
        key known to be bad, 503 for a request that would be shed)."""
        ...

    def recheck(self, model: str, call_id: str) -> Answer | None:
        """Before a request let in goes on into LiteLLM (after its wait in the pipeline): the
        503 when it would be shed now."""
        ...

    def finished(self, call_id: str, abandoned: bool) -> None:
        """The request let in as ``call_id`` is over; ``abandoned``: its client went away
        first, so what it holds must be given back now."""
        ...


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


def too_large_answer(limit_mb: float) -> Answer:
    return error_answer(
        413,
        f"the request body is larger than this gateway accepts ({limit_mb:g} MB)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


INTERNAL_ERROR = error_answer(
    500,
    "the gateway failed on this request (logged); retry it, or report it if it persists",
    "internal_server_error",
    None,
    "internal_error",
)
"""What a client gets for an exception that escaped LiteLLM's handlers, instead of the server's
plain-text ``Internal Server Error``: the OpenAI error envelope every other error has. (LiteLLM's
own handler for unhandled exceptions answers with that envelope, but it imports ``prisma`` first,
which a proxy without a database does not have, so the exception escapes it.)"""


async def send_answer(send: Send, answer: Answer) -> None:
    body = json.dumps(answer.payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in answer.headers),
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Pipeline:
    """At most ``size`` requests at once between the front door and the admission gate.

    LiteLLM's per-request work before the gate (parsing, authentication, logging set-up) is
    tens of milliseconds of CPU in one event loop. Let a flood into it at once and every answer,
    the front door's own 503s included, waits behind all of that work. Held here instead, the
    flood waits in a FIFO at no cost, and each request is judged (``ProxySide.let_in``) the
    moment it may go on: by then the gate has answered the ones before it, so the shed memo
    knows the queue is full and the rest get their 503 without entering LiteLLM at all. A slot
    is freed when the request reaches the gate, when its response starts, when it ends, or
    after ``hold_max_s`` (a route with no gate must not hold it).
    """

    def __init__(self, size: int, hold_max_s: float) -> None:
        self._free = asyncio.Semaphore(size)
        self._hold_max_s = hold_max_s
        self._held: dict[str, asyncio.TimerHandle] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    async def enter(self, call_id: str) -> None:
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        self._held[call_id] = loop.call_later(self._hold_max_s, self.leave, call_id)

    def leave(self, call_id: str) -> None:
        """Free ``call_id``'s slot (idempotent)."""
        handle = self._held.pop(call_id, None)
        if handle is not None:
            handle.cancel()
            self._free.release()


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


def call_id_for(client_id: bytes | None) -> str:
    """The request's call id (LiteLLM's ``litellm_call_id``, the admission ticket): unique
    and unguessable, so that no client can name another request's ticket; a client's own
    ``x-litellm-call-id`` (for its tracing) is kept as its prefix."""
    suffix = uuid.uuid4().hex
    if client_id:
        text = client_id.decode("latin-1").strip()
        if 0 < len(text) <= MAX_CLIENT_CALL_ID:
            return f"{text}.{suffix[:16]}"
    return str(uuid.UUID(suffix))


def _without_empty_internal(headers: Iterable[tuple[bytes, bytes]]) -> list[Any]:
    return [(k, v) for k, v in headers if v or k.lower() not in INTERNAL_HEADERS]


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
        self.pipeline = Pipeline(settings.pipeline_size, settings.pipeline_hold_max_ms / 1000)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            metrics.REJECTED.labels("request_too_large").inc()
            await send_answer(send, too_large_answer(self.settings.max_body_mb))
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
            await send_answer(send, too_large_answer(self.settings.max_body_mb))
            return
        except ClientGone:
            return
        checked = check_request(endpoint, body, self.proxy.max_tokens_limit)
        if not isinstance(checked, Rejected):
            checked = self.proxy.body_problem(checked, scope["path"]) or checked
        if isinstance(checked, Rejected):
            metrics.REJECTED.labels(checked.code).inc()
            log.info(
                "front door: 400 on %s: %s (param %s)", scope["path"], checked.code, checked.param
            )
            await send_answer(send, bad_request(checked))
            return
        call_id = call_id_for(_header(scope, CALL_ID_HEADER))
        abandoned = False
        try:
            if self.settings.shed:
                authorization = _header(scope, b"authorization")
                early = self.proxy.let_in(
                    authorization.decode("latin-1") if authorization else None,
                    checked.model,
                    call_id,
                    partial(self.pipeline.leave, call_id),
                )
                if early is not None:
                    await self._answer_early(send, early, started)
                    return
            await self.pipeline.enter(call_id)
            if self.settings.shed:  # judged again: the gate has answered those before it
                late = self.proxy.recheck(checked.model, call_id)
                if late is not None:
                    await self._answer_early(send, late, started)
                    return
            inner = dict(scope)
            inner["headers"] = _with_header(
                scope.get("headers") or (), CALL_ID_HEADER, call_id.encode()
            )
            abandoned = await self._run(inner, body, receive, send, call_id)
        finally:
            self.pipeline.leave(call_id)
            self.proxy.finished(call_id, abandoned)

    async def _answer_early(self, send: Send, answer: Answer, started: float) -> None:
        metrics.REJECTED.labels("shed" if answer.status == 503 else "unauthorized").inc()
        metrics.DECISION.observe(self._clock() - started)
        await send_answer(send, answer)

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
        """Any other route: LiteLLM reads the body itself, counted against the limit. Past it,
        LiteLLM is told the client went away (an exception raised into its body parsing would
        be taken for a malformed body) and whatever it answers is dropped for the 413."""
        limit = self.settings.max_body_bytes
        size = 0
        started = False
        too_large = False

        async def counted() -> Message:
            nonlocal size, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit and not started:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if too_large:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not too_large:
                raise
            log.debug("front door: LiteLLM's answer to a cut-off body", exc_info=True)
        if too_large:
            metrics.REJECTED.labels("request_too_large").inc()
            await send_answer(send, too_large_answer(self.settings.max_body_mb))

    async def _run(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, call_id: str
    ) -> bool:
        """Run LiteLLM's app on the buffered body; cancel it when the client goes away first.
        Returns whether it was abandoned so (the client gone before the answer was complete)."""
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

        answered = False  # a response start went out to the client

        async def sending(message: Message) -> None:
            nonlocal complete, answered
            if message["type"] == "http.response.start":
                self.pipeline.leave(call_id)
                message = {**message, "headers": _without_empty_internal(message["headers"])}
                answered = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
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
        except Exception:
            if not answered and not gone.is_set():
                # escaped the proxy before any answer: the client gets the OpenAI envelope, not
                # the server's plain-text 500; re-raised, so the server logs its traceback
                log.error("front door: request %s failed inside the proxy; answered 500", call_id)
                complete = True
                await send_answer(send, INTERNAL_ERROR)
            raise
        finally:
            listener.cancel()
        abandoned = gone.is_set() and not complete
        if abandoned:
            metrics.CANCELLED.inc()
            log.info("front door: client went away, request %s cancelled", call_id)
        return abandoned
