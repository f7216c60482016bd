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
import re
from collections.abc import Mapping

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
