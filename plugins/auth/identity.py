"""Who is asking: priority tier and key id of a request, from either kind of key.

Both auth modes produce a LiteLLM ``UserAPIKeyAuth`` with the same fields, so the admission and
routing plugins read a request's identity here and never care which mode made it:

* offline key store (``plugins.auth.custom_auth``): ``metadata``
  ``{"priority", "key_id", "key_source": "triage-keystore"}``,
  ``token`` = SHA-256 of the key;
* LiteLLM database keys: ``metadata`` as set by ``/key/generate`` (``{"priority": 0}``), team
  metadata when the key has none, ``token`` = SHA-256 of the key.

The key id is the first 12 hex digits of that SHA-256 in both modes (``triage keys list`` shows
the same id). Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from litellm.constants import LITELLM_PROXY_MASTER_KEY_ALIAS
from litellm.proxy._types import UserAPIKeyAuth

from plugins.auth.settings import DEFAULT_PRIORITY, PRIORITY_HIGHEST, PRIORITY_LOWEST

log = logging.getLogger("triage.auth.identity")

KEY_SOURCE = "triage-keystore"
"""``metadata["key_source"]`` of every key made by ``plugins.auth.custom_auth``."""
KEY_ID_LEN = 12
ANONYMOUS = "anonymous"
MASTER = "master"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_warned: set[str] = set()
_WARN_LIMIT = 1024


def _priority_value(value: object) -> int | None:
    """An int tier from metadata (int or digit string), or None when absent or unusable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"not an integer: {value!r}")
    if not PRIORITY_HIGHEST <= number <= PRIORITY_LOWEST:
        raise ValueError(f"{number} is outside {PRIORITY_HIGHEST}..{PRIORITY_LOWEST}")
    return number


def priority_of(user_api_key_dict: UserAPIKeyAuth, default: int = DEFAULT_PRIORITY) -> int:
    """The request's priority tier (0 = served first): key metadata, then team metadata."""
    sources = (
        ("metadata", user_api_key_dict.metadata),
        ("team_metadata", user_api_key_dict.team_metadata),
    )
    for where, metadata in sources:
        if not isinstance(metadata, Mapping) or "priority" not in metadata:
            continue
        try:
            value = _priority_value(metadata["priority"])
        except ValueError as exc:
            key_id = key_id_of(user_api_key_dict)
            if key_id not in _warned and len(_warned) < _WARN_LIMIT:
                _warned.add(key_id)
                log.warning("key %s: ignoring %s.priority: %s", key_id, where, exc)
            continue
        if value is not None:
            return value
    return default


def key_id_of(user_api_key_dict: UserAPIKeyAuth) -> str:
    """A short, stable, non-secret id of the key: metadata ``key_id``, else 12 hex of the token."""
    metadata = user_api_key_dict.metadata
    if isinstance(metadata, Mapping):
        key_id = metadata.get("key_id")
        if isinstance(key_id, str) and key_id:
            return key_id
    token = user_api_key_dict.token or user_api_key_dict.api_key
    if not token:
        return ANONYMOUS
    if token == LITELLM_PROXY_MASTER_KEY_ALIAS:
        return MASTER
    if not _SHA256_HEX.match(token):  # never show part of a key that LiteLLM did not hash
        token = hashlib.sha256(token.encode()).hexdigest()
    return token[:KEY_ID_LEN]


@dataclass(frozen=True)
class Flow:
    """A request's flow for the admission gate's fair share (``plugins/admission/rules.py``):
    who it is served as, that flow's weight, and the places in the queue it may hold."""

    name: str
    """``tenant:<name>`` when the key's (or its team's) metadata names a ``tenant``, else
    ``team:<id>`` for a key of a team, else ``key:<key id>``: never the key itself."""
    weight: float = 1.0
    """Metadata ``weight`` (> 0): the flow's share relative to the others of its tier."""
    max_queued: int | None = None
    """Metadata ``max_queued`` (>= 0): the most requests of the flow waiting in the queue."""


def _metadata_number(
    sources: tuple[tuple[str, object], ...], field: str, key_id: str, low: float
) -> float | None:
    """The first usable ``field`` (a number >= ``low``) of the metadata ``sources``."""
    for where, metadata in sources:
        if not isinstance(metadata, Mapping) or field not in metadata:
            continue
        value = metadata[field]
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not (math.isfinite(number) and number >= low):
                raise ValueError
        except (TypeError, ValueError):
            if key_id not in _warned and len(_warned) < _WARN_LIMIT:
                _warned.add(key_id)
                log.warning("key %s: ignoring %s.%s: %r", key_id, where, field, value)
            continue
        return number
    return None


def _word(text: str) -> str:
    """A name as one word of at most 128 characters (it travels in space-separated messages)."""
    return re.sub(r"\s+", "_", text.strip())[:128]


def flow_from(
    key_id: str,
    metadata: object,
    team_metadata: object = None,
    team_id: str | None = None,
) -> Flow:
    """The flow of a key (``flow_of``), from its metadata, its team's, and its ids."""
    sources = (("metadata", metadata), ("team_metadata", team_metadata))
    name = f"key:{key_id}"
    if team_id:
        name = f"team:{_word(team_id)}"
    for _, source in sources:
        tenant = source.get("tenant") if isinstance(source, Mapping) else None
        if isinstance(tenant, str) and tenant.strip():
            name = f"tenant:{_word(tenant)}"
            break
    weight = _metadata_number(sources, "weight", key_id, 0.0)
    queued = _metadata_number(sources, "max_queued", key_id, 0.0)
    return Flow(
        name=name,
        weight=weight if weight is not None and weight > 0.0 else 1.0,
        max_queued=int(queued) if queued is not None else None,
    )


def flow_of(user_api_key_dict: UserAPIKeyAuth) -> Flow:
    """The request's flow: its key's (or team's) ``tenant``, ``weight`` and ``max_queued``
    metadata, as ``priority_of`` reads ``priority``."""
    return flow_from(
        key_id_of(user_api_key_dict),
        user_api_key_dict.metadata,
        user_api_key_dict.team_metadata,
        user_api_key_dict.team_id,
    )
