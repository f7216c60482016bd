"""The Redis URLs every triage component accepts, Sentinel included, and their redaction.

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path?db=0``:
  one Redis server, as redis-py reads them.
* ``redis+sentinel://[[user]:password@]host1[:26379][,host2[:26379],...]/service[/db]``: the
  primary that the Sentinels at those addresses name for ``service``, found again after a
  failover. The password (and user) are the data nodes'; the Sentinels' own password, when they
  have one (``requirepass`` in sentinel.conf), is the query parameter ``sentinel_password``;
  ``?ssl=true`` speaks TLS to the data nodes.

Why Sentinel and not Cluster: ``deploy/README.md`` (the Lua scripts touch keys of several models
and replicas in one call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``redis+sentinel://`` URL; None for any other scheme. Raises
    ``ValueError`` naming what is wrong (never echoing the password)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        bare = ":" not in item or item.endswith("]")  # no port (an IPv6 host is bracketed)
        host, _, port = (item, "", "") if bare else item.rpartition(":")
        host = host.strip("[]")
        if not host:
            raise ValueError(f"a Sentinel address has no host: {redacted(url)!r}")
        try:
            sentinels.append((host, int(port) if port else SENTINEL_PORT))
        except ValueError:
            raise ValueError(f"bad Sentinel port {port!r} in {redacted(url)!r}") from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            f"want redis+sentinel://host:port[,host:port...]/SERVICE[/DB], got {redacted(url)!r}"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"the database must be a number: {redacted(url)!r}") from None
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password", "ssl"}
    if unknown:
        raise ValueError(f"unknown query parameter(s) {sorted(unknown)} in {redacted(url)!r}")
    ssl = query.get("ssl", ["false"])[-1].lower()
    if ssl not in ("true", "false", "1", "0"):
        raise ValueError(f"ssl must be true or false in {redacted(url)!r}")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[-1],
        ssl=ssl in ("true", "1"),
    )


def check_redis_url(url: str) -> str:
    """``url`` if triage can connect with it, else ``ValueError`` naming the accepted forms."""
    parts = urlsplit(url)
    if parts.scheme == SENTINEL_SCHEME:
        sentinel_target(url)
        return url
    if parts.scheme not in PLAIN_SCHEMES:
        raise ValueError(
            "must be a redis://, rediss://, unix:// or redis+sentinel:// URL, got "
            f"{redacted(url)!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"has no host: {redacted(url)!r}")
    return url


RedisUrl = Annotated[str, AfterValidator(check_redis_url)]
"""A settings field holding a Redis URL (plain or Sentinel), checked at startup."""


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^:@/?#]*):(.*)@")
_SECRET_QUERY = re.compile(r"([?&][^=&#]*password[^=&#]*=)[^&#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """The URL without its passwords, for logs and messages: everything between the user
    and the last ``@`` (a password may hold ``/``, ``?`` or ``#`` unescaped), and every query
    parameter whose name says password (``sentinel_password``, redis-py's ``password``)."""
    masked = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", url, count=1)
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}***", masked)
