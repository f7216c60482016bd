"""What the plugins set up once in the LiteLLM proxy process, whichever of them its config
names (each proxy callback module and the front door call ``prepare`` when imported): the
plugins' logging (``log_setup``) and the guard on LiteLLM's stream finalizer
(``stream_finalizer``)."""

from __future__ import annotations

from plugins import log_setup, stream_finalizer


def prepare() -> None:
    log_setup.configure()
    stream_finalizer.guard()
