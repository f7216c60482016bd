"""The stand-in engine's paged KV cache, with prefix reuse as TensorRT-LLM's KV cache manager
keeps it when ``enable_kv_cache_reuse`` is on.

* The cache has ``capacity`` blocks of ``tokens_per_block`` tokens. A sequence holds
  ``ceil((prompt + generated + 1) / tokens_per_block)`` blocks while it runs.
* A full block is known by a chained hash: block *i*'s covers the token ids of blocks 0..i, so
  two prompts share block *i* only if they share every token up to its end.
* At admission the longest cached prefix of the prompt's full blocks is **reused**: the sequence
  takes a reference on those blocks (several running sequences may share one) and the engine
  prefills only the tokens after them (at least the prompt's last token, which must be computed
  to produce the first output token).
* When its context (prefill) iteration ends, a sequence's full prompt blocks enter the cache,
  so requests that arrive while it runs reuse them too; when it ends, so do the full blocks of
  its generated tokens (a multi-turn conversation's next prompt starts with this answer). A
  block that is cached already (another sequence stored the same tokens) stays the sequence's
  own copy.
* Blocks that no running sequence references stay cached and count as **free**, as TensorRT-LLM
  counts them; they are evicted least recently used first (a prefix's last block before its
  first, so an evicted block never strands the blocks after it) when a new block is needed and
  no block is empty.

Not modelled: TensorRT-LLM's partial reuse of a block that matches only in part
(``enablePartialReuse``, on by default, with no Triton parameter), retention priorities, and
offloading evicted blocks to host memory. Sources: ``tests/fixtures/upstream/kv_cache_reuse.json``.

Pure Python, no Triton: ``tests/test_standin_kv_cache.py`` imports it directly.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

HASH_BYTES = 8


def block_hashes(token_ids: Sequence[int], tokens_per_block: int) -> list[bytes]:
    """The chained hashes of the full blocks of ``token_ids`` (a partial last block has none)."""
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, len(token_ids) - tokens_per_block + 1, tokens_per_block):
        block = token_ids[start : start + tokens_per_block]
        digest = hashlib.blake2b(previous, digest_size=HASH_BYTES)
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in block))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


@dataclass
class Holding:
    """The blocks one running sequence holds: references on cached blocks (in the order of its
    tokens) and blocks of its own outside the cache."""

    cached: list[bytes] = field(default_factory=list)
    own: int = 0
    covered: int = 0
    """Its leading full blocks that are in the cache (reused, stored, or stored by another)."""

    @property
    def blocks(self) -> int:
        return len(self.cached) + self.own


class PagedKVCache:
    def __init__(self, capacity: int, tokens_per_block: int, reuse: bool = True) -> None:
        if capacity < 1 or tokens_per_block < 1:
            raise ValueError(f"capacity={capacity} tokens_per_block={tokens_per_block}")
        self.capacity = capacity
        self.tokens_per_block = tokens_per_block
        self.reuse = reuse
        self.references: dict[bytes, int] = {}  # cached blocks that running sequences hold
        self.evictable: OrderedDict[bytes, None] = OrderedDict()  # cached, unheld: LRU first
        self.own = 0  # blocks held by running sequences outside the cache
        self.reused_blocks = 0  # since start: blocks found in the cache at admission
        self.missed_blocks = 0  # since start: full prompt blocks that were not

    # ---- what the metrics read --------------------------------------------------------------
    @property
    def used(self) -> int:
        """Blocks held by running sequences (a shared block once)."""
        return len(self.references) + self.own

    @property
    def free(self) -> int:
        """Every other block, cached-but-unheld ones included (they are evicted on demand)."""
        return self.capacity - self.used

    @property
    def cached_blocks(self) -> int:
        return len(self.references) + len(self.evictable)

    # ---- admission, growth, release ---------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` tokens holds, with room for its next token."""
        return math.ceil((tokens + 1) / self.tokens_per_block)

    def cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many of ``hashes`` (a prompt's full blocks) are cached, from the first on."""
        if not self.reuse:
            return 0
        count = 0
        for digest in hashes:
            if digest not in self.references and digest not in self.evictable:
                break
            count += 1
        return count

    def _room(self, spare_cached: int = 0) -> int:
        """Blocks a new allocation may take: empty ones and evictable ones (every block no
        running sequence holds), less the ``spare_cached`` evictable blocks that it is about to
        reference."""
        return self.capacity - self.used - spare_cached

    def _take(self, count: int) -> None:
        """``count`` blocks for a sequence's own use, evicting the least recently used."""
        empty = self.capacity - self.used - len(self.evictable)
        for _ in range(max(0, count - empty)):
            self.evictable.popitem(last=False)
        self.own += count

    def admit(self, hashes: Sequence[bytes], prompt_tokens: int) -> tuple[Holding, int] | None:
        """The blocks for a new sequence whose prompt has ``prompt_tokens`` tokens and full
        blocks ``hashes``, or None if they do not fit (nothing changes then). Returns its holding
        and the prompt tokens found cached (at most ``prompt_tokens - 1``)."""
        reused = self.cached_prefix(hashes)
        needed = self.blocks_for(prompt_tokens)
        new = needed - reused
        waking = sum(1 for digest in hashes[:reused] if digest in self.evictable)
        if new > self._room(spare_cached=waking):
            return None
        holding = Holding(cached=list(hashes[:reused]), covered=reused)
        for digest in holding.cached:
            if digest in self.evictable:
                del self.evictable[digest]
            self.references[digest] = self.references.get(digest, 0) + 1
        self._take(new)
        holding.own = new
        self.reused_blocks += reused
        self.missed_blocks += len(hashes) - reused
        return holding, min(reused * self.tokens_per_block, prompt_tokens - 1)

    def grow(self, holding: Holding, tokens: int) -> bool:
        """Room for the next token of a sequence now ``tokens`` long; False if none is left."""
        extra = self.blocks_for(tokens) - holding.blocks
        if extra <= 0:
            return True
        if extra > self._room():
            return False
        self._take(extra)
        holding.own += extra
        return True

    def store(self, holding: Holding, hashes: Sequence[bytes]) -> None:
        """Put the full blocks ``hashes`` of a running sequence's tokens in the cache (at the
        end of its context iteration: its prompt's): it goes on holding them, now shared."""
        if not self.reuse:
            return
        for digest in hashes[holding.covered :]:
            if holding.own == 0:
                break
            holding.covered += 1
            if digest in self.references or digest in self.evictable:
                continue  # stored by another sequence: this one keeps its own copy
            self.references[digest] = 1
            holding.cached.append(digest)
            holding.own -= 1
            self.own -= 1

    def release(self, holding: Holding, hashes: Sequence[bytes]) -> None:
        """A sequence ended, ``hashes`` being the full blocks of its tokens (prompt and
        generated): they stay cached (when reuse is on), unheld; the rest is freed."""
        self.store(holding, hashes)
        self.own -= holding.own
        # most recently used last; within a sequence its first block last, so a prefix's end
        # is evicted before its start
        for digest in reversed(holding.cached):
            count = self.references.get(digest, 0)
            if count > 1:
                self.references[digest] = count - 1
                continue
            self.references.pop(digest, None)
            self.evictable[digest] = None
            self.evictable.move_to_end(digest)
        holding.cached, holding.own, holding.covered = [], 0, 0
