"""The request's shape for the pick (plugins/routing/prefix.py): pure, no I/O."""

from __future__ import annotations

import pytest

from plugins.routing.prefix import (
    HASH_HEX,
    block_hashes,
    derive_salt,
    prompt_text,
    session_member,
    session_of_request,
    shape_of_request,
)

SALT = derive_salt("a secret every proxy shares")


def test_blocks_chain_so_a_shared_start_shares_its_hashes_and_nothing_after() -> None:
    a = block_hashes("x" * 512 + "tail one" * 40, SALT, 256, 16)
    b = block_hashes("x" * 512 + "tail two" * 40, SALT, 256, 16)
    assert a[:2] == b[:2] and a[2] != b[2]  # the same first two blocks, then different
    assert all(len(h) == HASH_HEX and int(h, 16) >= 0 for h in a)
    assert block_hashes("y" * 255, SALT, 256, 16) == ()  # a partial block has no hash
    assert block_hashes("x" * 512, derive_salt("another"), 256, 16) != a[:2]  # salted


def test_a_session_is_a_salted_member_that_no_block_hash_can_equal() -> None:
    member = session_member("conversation-1", SALT)
    assert member.startswith("s") and len(member) == 1 + HASH_HEX
    assert "conversation" not in member
    assert member != session_member("conversation-2", SALT)
    assert member != session_member("conversation-1", derive_salt("another"))


@pytest.mark.parametrize(
    ("request_fields", "session"),
    [
        ({"litellm_session_id": "ls", "metadata": {"session_id": "ms"}, "user": "u"}, "ls"),
        ({"metadata": {"session_id": "ms"}, "user": "u"}, "ms"),
        ({"user": "u"}, "u"),
        ({"user": "", "metadata": None}, None),
        ({}, None),
    ],
)
def test_the_session_id_is_litellms_else_the_user(
    request_fields: dict[str, object], session: str | None
) -> None:
    assert session_of_request(request_fields) == session


def test_the_shape_of_a_request() -> None:
    messages = [{"role": "system", "content": "s" * 600}, {"role": "user", "content": "hi"}]
    shape = shape_of_request(
        {"messages": messages, "max_tokens": 12, "user": "alice"}, SALT, 256, 16, 256
    )
    assert shape.output_tokens == 12 and len(shape.hashes) == len(prompt_text(messages)) // 256
    assert shape.session == session_member("alice", SALT)
    unbounded = shape_of_request({"messages": messages}, SALT, 256, 16, 256)
    assert unbounded.output_tokens == 256  # no max_tokens: the expected output
    off = shape_of_request({"messages": messages, "user": "alice"}, None, 256, 16, 256)
    assert off.hashes == () and off.session == ""  # no salt: affinity off
