"""The guard on LiteLLM's stream finalizer (``plugins/stream_finalizer.py``): LiteLLM's
``CustomStreamWrapper.__del__`` sets context variables, and run by the garbage collector inside
another context-variable ``set`` that crashes CPython 3.11 (python/cpython issue 148891; a
proxy died under the fault suite in CI). Guarded, it does nothing during a collection and runs
unchanged otherwise."""

from __future__ import annotations

import datetime
import gc
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from litellm.litellm_core_utils.litellm_logging import Logging
from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

from core.paths import REPO_ROOT
from plugins import stream_finalizer


def abandoned_stream() -> CustomStreamWrapper:
    logging_obj = Logging(
        model="standin",
        messages=[],
        stream=True,
        call_type="acompletion",
        start_time=datetime.datetime.now(),
        litellm_call_id="call",
        function_id="f",
    )
    return CustomStreamWrapper(
        completion_stream=None, model="standin", logging_obj=logging_obj, custom_llm_provider="x"
    )


@pytest.fixture
def restores(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Each call of LiteLLM's restore (the context-variable sets), with whether a collection
    was running."""
    calls: list[bool] = []
    monkeypatch.setattr(
        Logging,
        "_restore_correlation_context",
        lambda self: calls.append(stream_finalizer.collecting()),
    )
    stream_finalizer.guard()
    yield calls


def test_the_guard_is_installed_once() -> None:
    stream_finalizer.guard()
    guarded = CustomStreamWrapper.__del__
    stream_finalizer.guard()
    assert CustomStreamWrapper.__del__ is guarded
    assert guarded.__wrapped__.__qualname__ == "CustomStreamWrapper.__del__"  # type: ignore[attr-defined]
    assert stream_finalizer._track_collection in gc.callbacks


def test_a_stream_freed_by_the_collector_sets_no_context_variable(restores: list[bool]) -> None:
    stream = abandoned_stream()
    stream.cycle = stream  # type: ignore[attr-defined]  # only the collector can free it
    del stream
    gc.collect()
    assert restores == []


def test_without_the_guard_the_collector_would_set_them(restores: list[bool]) -> None:
    """What the guard prevents: LiteLLM's own finalizer restores inside the collection."""
    original = CustomStreamWrapper.__del__.__wrapped__  # type: ignore[attr-defined]
    stream = abandoned_stream()
    stream.cycle = stream  # type: ignore[attr-defined]
    del stream
    try:
        CustomStreamWrapper.__del__ = original  # type: ignore[method-assign]
        gc.collect()
    finally:
        CustomStreamWrapper.__del__ = stream_finalizer.skip_during_collection(original)  # type: ignore[method-assign]
    assert restores == [True]


def test_a_stream_dropped_by_its_task_still_restores(restores: list[bool]) -> None:
    stream = abandoned_stream()
    del stream  # no cycle: freed at once, outside any collection
    assert restores == [False]


def test_the_crash_it_prevents() -> None:
    """The interpreter's bug itself, in a child process: a finalizer that sets a context variable,
    run by a collection that a context-variable ``set`` started, frees the mapping that ``set``
    is walking. Not every run crashes (it depends on what reuses the freed memory); the test
    asks only that a guarded finalizer never does."""
    script = textwrap.dedent(
        """
        import contextvars, gc, sys
        sys.path.insert(0, sys.argv[1])
        from plugins import stream_finalizer
        var = contextvars.ContextVar("trace_id", default="")
        others = [contextvars.ContextVar(f"v{i}") for i in range(40)]
        class Finalized:
            def __del__(self):
                sys._getframe(1)
                var.set("")
        Finalized.__del__ = stream_finalizer.skip_during_collection(Finalized.__del__)
        gc.callbacks.append(stream_finalizer._track_collection)
        def run():
            for other in others:
                other.set(0)
            gc.set_threshold(1)
            for i in range(20000):
                cycle = Finalized()
                cycle.self = cycle
                del cycle
                others[i % 40].set(i)
            gc.set_threshold(700)
            print("survived")
        contextvars.Context().run(run)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO_ROOT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr)
