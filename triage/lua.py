"""Lua scripts for Redis, assembled from files: a line ``--! include <file>`` is replaced by
that file (relative to the including file's folder), so that two scripts can share a library
(``pick_lib.lua`` serves ``pick.lua`` and the admission gate's ``gate.lua``) and still each run
as one atomic ``EVALSHA``."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

INCLUDE = re.compile(r"^--! include (?P<file>\S+)[ \t]*$", re.MULTILINE)


@cache
def lua_source(path: Path) -> str:
    """The text of the script at ``path`` with its includes (and theirs) expanded, each once."""
    return _expand(path.resolve(), ())


def _expand(path: Path, including: tuple[Path, ...]) -> str:
    if path in including:
        chain = " -> ".join(p.name for p in (*including, path))
        raise ValueError(f"Lua include cycle: {chain}")
    try:
        text = path.read_text()
    except OSError as exc:
        where = f" (included by {including[-1]})" if including else ""
        raise FileNotFoundError(f"Lua script {path}{where}: {exc.strerror}") from exc

    def include(match: re.Match[str]) -> str:
        target = (path.parent / match["file"]).resolve()
        return f"-- {match['file']}:\n" + _expand(target, (*including, path)).rstrip("\n")

    return INCLUDE.sub(include, text)
