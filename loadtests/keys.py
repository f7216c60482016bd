"""Virtual keys for a load run, one per priority tier, written as a Locust keys file.

::

    python -m loadtests.keys --stack-state /tmp/stack/stack.json \\
        --tiers interactive:0:3,standard:1:2,batch:2:1 --out keys.json

``--tiers`` is ``label:priority:weight,...`` (priority 0 = first in the admission queue; weight =
the share of Locust users that use the key). The keys go to the stack's key store (its Redis,
``plugins/auth``); the file holds the plaintext keys: keep it private (it is written 0600).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from loadtests.load_settings import read_stack_state
from loadtests.traffic import KeyTier

DEFAULT_TIERS = "interactive:0:3,standard:1:2,batch:2:1"


def parse_tiers(spec: str) -> list[tuple[str, int, float]]:
    """``label:priority:weight,...`` -> [(label, priority, weight)]."""
    tiers = []
    for part in spec.split(","):
        if not part.strip():
            continue
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"tier {part!r}: expected label:priority:weight")
        label, priority, weight = bits[0], int(bits[1]), float(bits[2])
        KeyTier(key="x", priority=priority, weight=weight, tier=label)  # validates the ranges
        tiers.append((label, priority, weight))
    if not tiers:
        raise ValueError("no tiers")
    if len({t[0] for t in tiers}) != len(tiers):
        raise ValueError("tier labels must differ")
    return tiers


async def create_tier_keys(
    redis_url: str, key_prefix: str, tiers: Sequence[tuple[str, int, float]]
) -> list[KeyTier]:
    """One new key per tier in the key store; aliases ``load-<label>-<random>``."""
    from plugins.auth.keystore import KeyStore
    from plugins.auth.settings import KeysSettings

    store = KeyStore.from_settings(KeysSettings(redis_url=redis_url, key_prefix=key_prefix))
    out = []
    try:
        for label, priority, weight in tiers:
            alias = f"load-{label}-{uuid.uuid4().hex[:6]}"
            key, _ = await store.create(alias=alias, priority=priority)
            out.append(KeyTier(key=key, priority=priority, weight=weight, tier=label))
    finally:
        await store.aclose()
    return out


def write_keys(keys: Sequence[KeyTier], path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump([k.model_dump() for k in keys], out, indent=2)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.keys", description=__doc__)
    parser.add_argument("--stack-state", type=Path, default=None, help="stack.json or workdir")
    parser.add_argument("--tiers", default=DEFAULT_TIERS, help="label:priority:weight,...")
    parser.add_argument("--out", type=Path, required=True, help="the keys file to write")
    args = parser.parse_args(argv)
    try:
        tiers = parse_tiers(args.tiers)
        stack = read_stack_state(args.stack_state)
    except (ValueError, ValidationError) as exc:
        print(f"loadtests.keys: invalid setting tiers: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"loadtests.keys: invalid setting stack_state: {exc}", file=sys.stderr)
        return 2
    if not stack or not stack.get("redis_url"):
        print("loadtests.keys: invalid setting stack_state: no stack.json", file=sys.stderr)
        return 2
    keys = asyncio.run(
        create_tier_keys(stack["redis_url"], stack.get("key_prefix") or "triage:", tiers)
    )
    write_keys(keys, args.out)
    print(f"{len(keys)} keys ({', '.join(t[0] for t in tiers)}) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
