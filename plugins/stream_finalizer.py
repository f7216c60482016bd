"""Keep LiteLLM's stream finalizer from crashing the proxy inside a garbage collection.

LiteLLM's ``CustomStreamWrapper.__del__`` (``litellm/litellm_core_utils/streaming_handler.py``,
1.106.12) restores the ``trace_id`` / ``session_id`` context variables of a stream its caller
abandoned (a client that left, a stream restarted on another replica). When the cyclic garbage
collector runs that finalizer, it runs in the middle of whatever allocated last; if that was a
context-variable ``set`` (``_PyHamt_Assoc`` allocates tracked nodes, and on CPython 3.11 an
allocation can start a collection at once), the finalizer's own ``set`` replaces and frees the
context's mapping while the outer ``set`` is still walking it: a use-after-free that kills the
proxy with SIGSEGV in ``hamt_node_bitmap_assoc`` (python/cpython issue 148891, unfixed in 3.11).
CI saw it under the fault suite: a proxy died and every later request to it was cut.

The guard keeps LiteLLM's finalizer as it is, except while a collection is running: then it
does nothing. The restore it skips is LiteLLM's own "best effort" (its docstring): a collection
runs the finalizer in whichever task happened to allocate, not the stream's, and with
``litellm.request_correlation_in_logs`` off (LiteLLM's default and the embedded stack's) it writes
``""`` over ``""``. Outside a collection (the last reference dropped in the stream's own task)
the finalizer runs unchanged.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_collecting = False
_GUARD_MARK = "_triage_skips_during_gc"


def _track_collection(phase: str, _info: dict[str, Any]) -> None:
    global _collecting
    _collecting = phase == "start"


def collecting() -> bool:
    """Whether the cyclic garbage collector is running now (in this interpreter)."""
    return _collecting


def skip_during_collection(finalizer: Callable[[Any], None]) -> Callable[[Any], None]:
    """``finalizer``, except that it does nothing while the garbage collector runs it."""

    def guarded(self: Any) -> None:
        if _collecting:
            return
        finalizer(self)

    setattr(guarded, _GUARD_MARK, True)
    guarded.__wrapped__ = finalizer  # type: ignore[attr-defined]
    return guarded


def guard() -> None:
    """Install the guard on LiteLLM's ``CustomStreamWrapper.__del__`` (once per process)."""
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    if _track_collection not in gc.callbacks:
        gc.callbacks.append(_track_collection)
    finalizer = getattr(CustomStreamWrapper, "__del__", None)
    if finalizer is None or getattr(finalizer, _GUARD_MARK, False):
        return  # a LiteLLM without the finalizer, or guarded already
    CustomStreamWrapper.__del__ = skip_during_collection(finalizer)  # type: ignore[method-assign]
    log.debug("LiteLLM's CustomStreamWrapper.__del__ skips its restore during a collection")
