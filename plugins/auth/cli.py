"""``triage keys``: create, list and revoke offline virtual keys.

::

    triage keys create --alias team-a [--models m1,m2] [--priority 0..9] [--max-parallel N] [--json]
    triage keys list [--json]
    triage keys revoke ID_OR_ALIAS

Where the keys live: ``--redis-url`` / ``--key-prefix``, else ``TRIAGE_KEYS_REDIS_URL`` /
``TRIAGE_KEYS_KEY_PREFIX``, else, when ``TRIAGE_STACK_STATE`` names the ``stack.json`` of a
running ``triage up`` (or its workdir), that stack's ``redis_url`` and ``key_prefix``.

Exit status: 0 done; 1 the store refused (alias taken, no such key) or is unreachable;
2 bad settings or arguments (the field is named).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from core.redis_url import redacted
from plugins.auth.keystore import KeyRecord, KeyStore, KeyStoreError
from plugins.auth.settings import DEFAULT_PRIORITY, KeysSettings

PROG = "triage keys"
STACK_STATE_ENV = "TRIAGE_STACK_STATE"
ENV_PREFIX = "TRIAGE_KEYS_"
FLAGS = {"redis_url": "--redis-url", "key_prefix": "--key-prefix"}


class UsageError(Exception):
    """Bad settings or arguments: exit 2."""


def _store_options(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_argument_group("key store")
    group.add_argument(
        "--redis-url", default=default, help=f"default: ${ENV_PREFIX}REDIS_URL or the stack's"
    )
    group.add_argument(
        "--key-prefix", default=default, help=f"default: ${ENV_PREFIX}KEY_PREFIX or 'triage:'"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Offline virtual keys for the LiteLLM proxy (only SHA-256 hashes are stored).",
    )
    _store_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="make a key; it is printed once, never stored")
    _store_options(create, argparse.SUPPRESS)
    create.add_argument("--alias", required=True, help="unique name, e.g. team-a")
    create.add_argument(
        "--models", default="", help="comma-separated models the key may call; default all"
    )
    create.add_argument(
        "--priority",
        type=int,
        default=DEFAULT_PRIORITY,
        help=f"admission tier, 0 (first) .. 9 (last); default {DEFAULT_PRIORITY}",
    )
    create.add_argument(
        "--max-parallel", type=int, default=None, help="concurrent requests; default unlimited"
    )
    create.add_argument(
        "--tenant",
        default=None,
        help="the flow the admission gate serves the key's requests as (keys of one tenant "
        "share its fair share); default the key itself",
    )
    create.add_argument(
        "--weight",
        type=float,
        default=None,
        help="the flow's share relative to the others of its tier (> 0); default 1",
    )
    create.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="the most requests of the flow waiting in a model's queue (over it: 429)",
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")

    listing = commands.add_parser("list", help="the live keys (never the keys themselves)")
    _store_options(listing, argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true", help="print a JSON array")

    revoke = commands.add_parser("revoke", help="delete a key by its id or alias")
    _store_options(revoke, argparse.SUPPRESS)
    revoke.add_argument("id_or_alias", metavar="ID_OR_ALIAS")
    return parser


def _stack_state(path_text: str) -> dict[str, Any]:
    path = Path(path_text)
    if path.is_dir():
        path = path / "stack.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{STACK_STATE_ENV}={path_text}: cannot read {path}: {exc}") from exc
    if not isinstance(state, dict) or not state.get("redis_url"):
        raise UsageError(f"{STACK_STATE_ENV}={path_text}: {path} has no redis_url")
    return state


def resolve_settings(args: argparse.Namespace) -> KeysSettings:
    """Flags, then ``TRIAGE_KEYS_*``, then the running stack's ``stack.json``."""
    env = os.environ
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None
    }
    state_path = env.get(STACK_STATE_ENV)
    if "redis_url" not in overrides and not env.get(f"{ENV_PREFIX}REDIS_URL") and state_path:
        state = _stack_state(state_path)
        overrides["redis_url"] = state["redis_url"]
        prefix_given = "key_prefix" in overrides or env.get(f"{ENV_PREFIX}KEY_PREFIX")
        if not prefix_given and isinstance(state.get("key_prefix"), str):
            overrides["key_prefix"] = state["key_prefix"]
    return KeysSettings(**overrides)


def _invalid(exc: ValidationError, hints: Mapping[str, str] | None = None) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        hint = ""
        if hints and field in hints:
            hint = f" ({hints[field]})"
        lines.append(f"{PROG}: invalid setting {field}: {err['msg']}{hint}")
    return "\n".join(lines)


def _models_text(record: KeyRecord) -> str:
    return ",".join(record.models) if record.models else "*"


def _record_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "alias": record.alias,
        "models": list(record.models),
        "priority": record.priority,
        "max_parallel_requests": record.max_parallel_requests,
        "created_at": record.created_at.isoformat(),
    }


def format_table(records: Sequence[KeyRecord]) -> str:
    header = ("id", "alias", "models", "priority", "max_parallel", "created")
    rows = [header] + [
        (
            r.key_id,
            r.alias,
            _models_text(r),
            str(r.priority),
            "-" if r.max_parallel_requests is None else str(r.max_parallel_requests),
            r.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _run(args: argparse.Namespace, settings: KeysSettings) -> int:
    store = KeyStore.from_settings(settings)
    try:
        if args.command == "create":
            models = [m.strip() for m in args.models.split(",") if m.strip()]
            try:
                plaintext, record = await store.create(
                    args.alias,
                    models,
                    args.priority,
                    args.max_parallel,
                    metadata=_flow_metadata(args),
                )
            except ValidationError as exc:
                hints = {"max_parallel_requests": "--max-parallel"}
                print(_invalid(exc, hints), file=sys.stderr)
                return 2
            if args.json:
                print(json.dumps({"key": plaintext, **_record_json(record)}))
            else:
                print(plaintext)
                print(f"key_id  {record.key_id}")
                print(f"alias   {record.alias}")
                print(f"models  {_models_text(record)}")
                print(f"priority {record.priority}  max_parallel {record.max_parallel_requests}")
            print(
                "Save the key now: it is shown only this once (only its SHA-256 is stored).",
                file=sys.stderr,
            )
        elif args.command == "list":
            records = await store.list()
            if args.json:
                print(json.dumps([_record_json(r) for r in records]))
            else:
                print(format_table(records))
        elif args.command == "revoke":
            revoked = await store.revoke(args.id_or_alias)
            print(
                f"revoked {revoked.key_id} ({revoked.alias}); proxies refuse it within "
                f"their cache TTL ({ENV_PREFIX}CACHE_TTL_S, 5 s by default)"
            )
        return 0
    except KeyStoreError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(
            f"{PROG}: cannot reach the key store at {redacted(settings.redis_url)}: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        await store.aclose()


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        settings = resolve_settings(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        hints = {
            name: f"{flag} or ${ENV_PREFIX}{name.upper()}, or ${STACK_STATE_ENV}"
            if name == "redis_url"
            else f"{flag} or ${ENV_PREFIX}{name.upper()}"
            for name, flag in FLAGS.items()
        }
        print(_invalid(exc, hints), file=sys.stderr)
        return 2
    return asyncio.run(_run(args, settings))


def _flow_metadata(args: argparse.Namespace) -> dict[str, object] | None:
    """The admission gate's fair-share fields of a new key (``identity.flow_of`` reads them)."""
    if args.weight is not None and not args.weight > 0:
        raise SystemExit("--weight must be > 0")
    if args.max_queued is not None and args.max_queued < 0:
        raise SystemExit("--max-queued must be >= 0")
    fields = {"tenant": args.tenant, "weight": args.weight, "max_queued": args.max_queued}
    metadata = {k: v for k, v in fields.items() if v is not None}
    return metadata or None
