"""Logging of the plugins inside the LiteLLM proxy process.

LiteLLM configures only its own loggers, so without this the plugins' INFO records (a cold
load, a stream restarted on another replica, a shed) would reach no handler and vanish (Python
prints only WARNING and above by default). Each proxy callback module calls ``configure`` once:
a stderr handler on the ``plugins`` and ``triage`` loggers at ``TRIAGE_LOG_LEVEL`` (default
INFO), which the proxy launcher writes to the proxy's log file.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NAMESPACES = ("plugins", "triage")


def configure(level: str | None = None) -> None:
    chosen = (level or os.environ.get("TRIAGE_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(f"TRIAGE_LOG_LEVEL: unknown level {chosen!r}")
    for name in NAMESPACES:
        logger = logging.getLogger(name)
        if any(getattr(h, "triage", False) for h in logger.handlers):
            continue  # configured already (several callbacks in one process)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.triage = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(chosen)
        logger.propagate = False
