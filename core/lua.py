"""Lua scripts for Redis, assembled from files, with their calling protocols declared once.

Includes: a line ``--! include <file>`` is replaced by that file (relative to the including
file's folder), so that two scripts can share a library (``pick_lib.lua`` serves ``pick.lua``
and the admission gate's ``gate.lua``) and still each run as one atomic ``EVALSHA``.

Protocols: a script's KEYS, ARGV and reply layout are declared in Python, once, as a
``ScriptProtocol`` next to the script's caller. A line ``--! protocol <name>`` in the script is
replaced by Lua generated from it: ``KEY.<name>`` and ``ARG.<name>`` (already converted to
numbers where the protocol says so), ``FIXED_KEYS`` / ``FIXED_ARGS`` (the variable part, when the
script has one, starts after them) and ``REPLY{...}``, which lays out a reply by field name. The
caller builds ``keys``/``args`` and decodes the reply through the same object, so neither side
counts positions. An ``ArgGroup`` is a run of arguments whose position is known only at run time
(the pick's policy parameters, after the gate's own): it becomes a Lua function
``<name>(first)`` returning a table by field name, and ``<NAME>_COUNT``.

``lua_source`` checks that a script uses exactly the ``KEY``/``ARG`` fields its protocol
declares (a misspelt field would read nil and fail silently), and that ``REPLY`` is not used
by a script whose protocol declares no reply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Literal

INCLUDE = re.compile(r"^--! include (?P<file>\S+)[ \t]*$", re.MULTILINE)
PROTOCOL = re.compile(r"^--! protocol (?P<name>\w+)[ \t]*$", re.MULTILINE)

Kind = Literal["str", "int", "float", "opt_float"]
"""How a value travels: ``str`` as is; ``int`` a whole number; ``float`` a double as its
shortest round-trip decimal (``repr``: Lua's ``tonumber``, i.e. ``strtod``, reads back the same
double; replies send it as ``%.17g``, since Redis truncates Lua numbers to integers);
``opt_float`` the same or ``''`` for none (Lua: nil)."""


@dataclass(frozen=True)
class Field:
    """One key, argument or reply value of a script, by name."""

    name: str
    kind: Kind = "str"

    def encode(self, value: Any) -> str:
        if self.kind == "str":
            if not isinstance(value, str):
                raise TypeError(f"{self.name} must be a str, got {value!r}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"{self.name} must be a whole number, got {value!r}")
            return str(int(value))
        if value is None:
            if self.kind == "opt_float":
                return ""
            raise TypeError(f"{self.name} must be a number, got None")
        return repr(float(value))

    def decode(self, value: Any) -> Any:
        if isinstance(value, bytes):
            value = value.decode()
        if self.kind == "str":
            return str(value)
        if self.kind == "int":
            return int(value)
        if value in ("", None):
            return None
        return float(value)

    def lua_read(self, source: str) -> str:
        """Lua reading this argument from ``source`` (an ``ARGV[...]`` expression)."""
        if self.kind == "str":
            return source
        if self.kind == "opt_float":
            return f"tonumber({source} or '')"
        return f"tonumber({source})"

    def lua_write(self, source: str) -> str:
        """Lua putting this reply value into a Redis reply."""
        if self.kind in ("float", "opt_float"):
            return f"string.format('%.17g', {source})"
        return source


def fields(*specs: str | tuple[str, Kind]) -> tuple[Field, ...]:
    """``fields("op", ("priority", "int"))``: names, with a kind where it is not ``str``."""
    return tuple(Field(s) if isinstance(s, str) else Field(*s) for s in specs)


def _named(values: Mapping[str, Any], declared: Sequence[Field], what: str) -> list[str]:
    """``values`` encoded in the declared order; every declared name, and only those."""
    try:
        out = [f.encode(values[f.name]) for f in declared]
    except KeyError:
        out = None
    if out is None or len(values) != len(declared):
        names = [f.name for f in declared]
        missing = sorted(set(names) - set(values))
        extra = sorted(set(values) - set(names))
        raise ValueError(f"{what}: missing {missing}, unknown {extra}")
    return out


@dataclass(frozen=True)
class ArgGroup:
    """A run of arguments at a position the script learns at run time."""

    name: str
    args: tuple[Field, ...]

    def argv(self, **values: Any) -> list[str]:
        return _named(values, self.args, f"{self.name} arguments")

    def lua(self) -> str:
        body = ",\n".join(
            f"    {f.name} = {f.lua_read(f'ARGV[first + {i}]')}" for i, f in enumerate(self.args)
        )
        return (
            f"-- argument group {self.name!r} (declared in Python: core.lua.ArgGroup)\n"
            f"local {self.name.upper()}_COUNT = {len(self.args)}\n"
            f"local function {self.name}(first)\n  return {{\n{body},\n  }}\nend"
        )


@dataclass(frozen=True)
class ScriptProtocol:
    """A script's fixed KEYS and ARGV (each by name, in order) and its reply's fields; a
    variable part of KEYS or ARGV may follow the fixed one (the script's header says what)."""

    name: str
    keys: tuple[str, ...] = ()
    args: tuple[Field, ...] = ()
    reply: tuple[Field, ...] = ()

    @cached_property
    def _key_fields(self) -> tuple[Field, ...]:
        return fields(*self.keys)

    def keys_for(self, rest: Sequence[str] = (), **values: str) -> list[str]:
        return _named(values, self._key_fields, f"{self.name} keys") + list(rest)

    def argv(self, rest: Sequence[str] = (), **values: Any) -> list[str]:
        return _named(values, self.args, f"{self.name} arguments") + list(rest)

    def decode(self, raw: Sequence[Any]) -> tuple[dict[str, Any], list[Any]]:
        """The reply's declared fields by name, and what follows them."""
        if len(raw) < len(self.reply):
            raise ValueError(
                f"{self.name} replied {len(raw)} values, expected at least {len(self.reply)}"
            )
        named = {f.name: f.decode(v) for f, v in zip(self.reply, raw, strict=False)}
        return named, list(raw[len(self.reply) :])

    def lua(self) -> str:
        lines = [f"-- protocol {self.name!r} (declared in Python: core.lua.ScriptProtocol)"]
        keys = "".join(f" {k} = KEYS[{i}]," for i, k in enumerate(self.keys, 1))
        lines.append(f"local KEY = {{{keys} }}")
        lines.append(f"local FIXED_KEYS = {len(self.keys)}")
        args = "".join(
            f"\n  {f.name} = {f.lua_read(f'ARGV[{i}]')}," for i, f in enumerate(self.args, 1)
        )
        lines.append(f"local ARG = {{{args}\n}}")
        lines.append(f"local FIXED_ARGS = {len(self.args)}")
        if self.reply:
            # every field is named, so a nil one (which would cut the reply short) is an error
            checks = "".join(
                f"\n  assert(r.{f.name} ~= nil, '{self.name} reply: {f.name} is nil')"
                for f in self.reply
            )
            values = ", ".join(f.lua_write(f"r.{f.name}") for f in self.reply)
            lines.append(f"local function REPLY(r){checks}\n  return {{ {values} }}\nend")
        return "\n".join(lines)

    def check(self, source: str, script: Path) -> None:
        """Raise unless ``source`` uses exactly the declared KEY and ARG fields."""
        for table, declared in (("KEY", set(self.keys)), ("ARG", {f.name for f in self.args})):
            used = set(re.findall(rf"\b{table}\.(\w+)", source))
            if used != declared:
                raise ValueError(
                    f"{script.name}: {table} fields used {sorted(used)} but protocol "
                    f"{self.name!r} declares {sorted(declared)}"
                )
        if not self.reply and re.search(r"\bREPLY\s*[({]", source):
            raise ValueError(f"{script.name}: uses REPLY, protocol {self.name!r} has no reply")


Protocol = ScriptProtocol | ArgGroup


@cache
def lua_source(path: Path, *protocols: Protocol) -> str:
    """The text of the script at ``path`` with its includes (and theirs) expanded, each once,
    and each ``--! protocol <name>`` line replaced by the Lua of the protocol of that name."""
    text = _expand(path.resolve(), ())
    by_name = {p.name: p for p in protocols}
    if len(by_name) != len(protocols):
        raise ValueError(f"{path.name}: two protocols share a name")
    wanted = PROTOCOL.findall(text)
    missing = sorted(set(wanted) - set(by_name))
    unused = sorted(set(by_name) - set(wanted))
    if missing or unused or len(wanted) != len(set(wanted)):
        raise ValueError(
            f"{path.name}: protocol lines {wanted}; given {sorted(by_name)} "
            f"(missing {missing}, unused {unused})"
        )
    text = PROTOCOL.sub(lambda m: by_name[m["name"]].lua(), text)
    for protocol in protocols:
        if isinstance(protocol, ScriptProtocol):
            protocol.check(text, path)
    return text


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
