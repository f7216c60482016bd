"""The request's shape for the pick: its size, and salted hashes of its prompt's leading blocks
for the prefix index that every proxy shares in Redis (pure, no I/O).

A router in front of Triton cannot see TensorRT-LLM's KV-cache events (Triton does not expose
them), so, as llm-d's approximate prefix scorer does, each replica's cache is approximated by
what was sent to it: the prompt is cut into fixed blocks of ``block_chars`` characters (no
tokenizer: the proxy serves models it has no tokenizer for), each block's hash chains the
previous one (block *i*'s hash stands for the whole text up to its end), and the pick that sends
the prompt to a replica records its blocks in that replica's index (``pick_lib.lua``). Another
prompt that starts with the same text finds the replica that holds its first blocks.

Nothing reversible reaches Redis: each hash is an HMAC-SHA256 keyed by a secret every proxy
shares (``TRIAGE_ROUTING_PREFIX_SALT``, else derived from the proxy's master key), cut to 64
bits; the text itself is never stored or logged. A short prompt whose text an attacker can guess
is safe as long as the salt is secret.

A request's **session** (LiteLLM's session id: the ``x-litellm-session-id`` header,
``litellm_session_id`` or ``metadata.session_id``; else the OpenAI ``user`` field) is one more
member of the same index, ``s`` + the HMAC of the id: a replica that has served the session wins
the ties the prompt's blocks leave (``policy.choose``), for conversations whose prompts share no
text with their last turn (a client that trims its history, short prompts under one block).

The prompt is the request's messages as the chat template would see them: each message's role
and text, in order (multi-part content: its text parts; other parts by their type), so two
requests with the same system prompt share their first blocks whatever follows.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from plugins.routing.policy import MAX_PROMPT_BLOCKS, RequestShape
from plugins.triton_provider.tokens import count_tokens

HASH_HEX = 16
"""Hex digits of a block hash in the index (64 bits: ~20 B of member per block in Redis)."""


def prompt_text(messages: Iterable[Mapping[str, Any]] | None, prompt: Any = None) -> str:
    """The text the prefix blocks are cut from: ``role\\ncontent\\n`` per message (chat), else
    the completion ``prompt``."""
    if messages is None:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):
            return "\n".join(str(p) for p in prompt)
        return ""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        parts.append(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for piece in content:
                if isinstance(piece, Mapping):
                    text = piece.get("text")
                    parts.append(text if isinstance(text, str) else f"<{piece.get('type', '')}>")
        elif content is not None:
            parts.append(str(content))
        parts.append("")
    return "\n".join(parts)


def block_hashes(text: str, salt: bytes, block_chars: int, max_blocks: int) -> tuple[str, ...]:
    """The chained, salted hashes of the full ``block_chars`` blocks of ``text`` (at most
    ``max_blocks``; a partial last block has none), hex."""
    if block_chars < 1 or not 0 <= max_blocks <= MAX_PROMPT_BLOCKS:
        raise ValueError(f"block_chars {block_chars}, max_blocks {max_blocks}")
    out: list[str] = []
    previous = b""
    count = min(max_blocks, len(text) // block_chars)
    for i in range(count):  # blocks of characters, hashed as their UTF-8 bytes
        chunk = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        previous = hmac.new(salt, previous + chunk, hashlib.sha256).digest()
        out.append(previous[: HASH_HEX // 2].hex())
    return tuple(out)


def session_member(session_id: str, salt: bytes) -> str:
    """The index member of a session: ``s`` + 16 hex digits of its salted HMAC (never a block
    hash, which is hex only)."""
    digest = hmac.new(salt, b"session\0" + session_id.encode("utf-8", "surrogatepass"), "sha256")
    return "s" + digest.digest()[: HASH_HEX // 2].hex()


def session_of_request(request: Mapping[str, Any]) -> str | None:
    """The request's session id: LiteLLM's (``litellm_session_id``, set from the
    ``x-litellm-session-id`` header; or ``metadata.session_id``), else the OpenAI ``user``."""
    metadata = request.get("metadata")
    for value in (
        request.get("litellm_session_id"),
        metadata.get("session_id") if isinstance(metadata, Mapping) else None,
        request.get("user"),
    ):
        if isinstance(value, str) and value:
            return value
    return None


def request_shape(
    text: str,
    prompt_tokens: int,
    output_tokens: int,
    salt: bytes | None,
    block_chars: int,
    max_blocks: int,
    session_id: str | None = None,
) -> RequestShape:
    """The shape of a request: ``prompt_tokens`` (counted by the caller), the expected
    ``output_tokens``, the prompt's block hashes and its session's member (none without a
    ``salt``: affinity off)."""
    hashes = block_hashes(text, salt, block_chars, max_blocks) if salt else ()
    tokens_per_block = prompt_tokens * block_chars / len(text) if text else 0.0
    return RequestShape(
        prompt_tokens=max(0, prompt_tokens),
        output_tokens=max(1, output_tokens),
        tokens_per_block=tokens_per_block,
        hashes=hashes,
        session=session_member(session_id, salt) if salt and session_id else "",
    )


def cached_prefix(found: Sequence[float | None] | None) -> int:
    """How many leading blocks an index holds, from ``ZMSCORE``'s answer for the prompt's
    hashes (None for a missing member): up to the first missing one, as ``pick_lib.lua``."""
    count = 0
    for score in found or ():
        if score is None:
            break
        count += 1
    return count


def derive_salt(secret: str) -> bytes:
    """The index salt from a secret every proxy shares (a dedicated salt, or the master key)."""
    return hashlib.sha256(b"triage prefix index\0" + secret.encode()).digest()


def shape_of_request(
    request: Mapping[str, Any],
    salt: bytes | None,
    block_chars: int,
    max_blocks: int,
    default_output_tokens: int,
) -> RequestShape:
    """The shape of a LiteLLM request (its ``messages`` or ``prompt``/``input``, its
    ``max_tokens`` / ``max_completion_tokens``): prompt tokens by the gateway's count, the
    output it may produce (``default_output_tokens`` when it sets no bound)."""
    text = prompt_text(request.get("messages"), request.get("prompt", request.get("input")))
    output = request.get("max_completion_tokens") or request.get("max_tokens")
    try:
        output_tokens = int(output) if output is not None else default_output_tokens
    except (TypeError, ValueError):
        output_tokens = default_output_tokens  # the front door answers a bad value with 400
    return request_shape(
        text,
        count_tokens(text),
        output_tokens,
        salt,
        block_chars,
        max_blocks,
        session_of_request(request),
    )
