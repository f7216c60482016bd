"""``--! include`` in the Lua scripts (expanded once per line, relative to the including file)
and ``--! protocol`` (each script's KEYS, ARGV and reply, declared once in Python)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.lua import ArgGroup, ScriptProtocol, fields, lua_source
from plugins.admission.gate import GATE, GATE_LUA
from plugins.routing.leases import RENEW, RENEW_LUA
from plugins.routing.store import (
    COUNT,
    COUNT_LUA,
    PICK,
    PICK_LUA,
    PICK_PARAMS,
    RELEASE,
    RELEASE_LUA,
)
from sidecar.service import PUBLISH, PUBLISH_LUA

SCRIPTS = [
    (GATE_LUA, (GATE, PICK_PARAMS)),
    (PICK_LUA, (PICK, PICK_PARAMS)),
    (RELEASE_LUA, (RELEASE,)),
    (COUNT_LUA, (COUNT,)),
    (RENEW_LUA, (RENEW,)),
    (PUBLISH_LUA, (PUBLISH,)),
]


def test_every_script_loads_with_its_protocols_and_gate_and_pick_share_the_library() -> None:
    for script, protocols in SCRIPTS:
        text = lua_source(script, *protocols)
        assert not any(line.startswith("--!") for line in text.splitlines()), script
    for script in (GATE_LUA, PICK_LUA):
        text = lua_source(script, *dict(SCRIPTS)[script])
        assert text.count("local function pick_replica(") == 1
        assert text.count("local function pick_params(first)") == 1


def test_a_script_without_its_protocol_or_with_a_misspelt_field_fails_to_load(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"missing \['gate', 'pick_params'\]"):
        lua_source(GATE_LUA)
    with pytest.raises(ValueError, match=r"unused \['release'\]"):
        lua_source(PICK_LUA, PICK, PICK_PARAMS, RELEASE)
    proto = ScriptProtocol("p", keys=("set",), args=fields("member", ("n", "int")))
    (tmp_path / "typo.lua").write_text("--! protocol p\nreturn {KEY.set, ARG.membre, ARG.n}\n")
    with pytest.raises(ValueError, match=r"ARG fields used \['membre', 'n'\]"):
        lua_source(tmp_path / "typo.lua", proto)
    (tmp_path / "unused.lua").write_text("--! protocol p\nreturn {KEY.set, ARG.n}\n")
    with pytest.raises(ValueError, match=r"declares \['member', 'n'\]"):
        lua_source(tmp_path / "unused.lua", proto)
    (tmp_path / "noreply.lua").write_text(
        "--! protocol p\nreturn REPLY{x = KEY.set .. ARG.member .. ARG.n}\n"
    )
    with pytest.raises(ValueError, match="has no reply"):
        lua_source(tmp_path / "noreply.lua", proto)


def test_callers_name_every_value_and_only_declared_ones() -> None:
    assert RELEASE.keys_for(inflight="k") == ["k"]
    assert RELEASE.argv(reservation="r") == ["r"]
    with pytest.raises(ValueError, match=r"missing \['reservation'\], unknown \['id'\]"):
        RELEASE.argv(id="r")
    group = ArgGroup("g", fields(("a", "int"), ("b", "float"), ("c", "opt_float"), "d"))
    assert group.argv(a=3, b=0.1, c=None, d="x") == ["3", "0.1", "", "x"]
    with pytest.raises(TypeError, match="a must be a whole number"):
        group.argv(a=1.5, b=0.0, c=1.0, d="x")
    with pytest.raises(TypeError, match="d must be a str"):
        group.argv(a=1, b=0.0, c=1.0, d=7)
    named, rest = PICK.decode([b"2", 5, b"0.30000000000000004", b"extra"])
    assert named == {"index": 2, "inflight": 5, "score": 0.30000000000000004}
    assert rest == [b"extra"]
    with pytest.raises(ValueError, match="replied 2 values, expected at least 3"):
        PICK.decode([1, 2])


def test_nested_includes_resolve_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.lua").write_text("local A = 1\n--! include b.lua\n")
    (tmp_path / "lib" / "b.lua").write_text("local B = 2\n")
    (tmp_path / "main.lua").write_text("--! include lib/a.lua\nreturn A + B\n")
    text = lua_source(tmp_path / "main.lua")
    assert text.index("local A = 1") < text.index("local B = 2") < text.index("return A + B")


def test_a_cycle_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.lua").write_text("--! include y.lua\n")
    (tmp_path / "y.lua").write_text("--! include x.lua\n")
    with pytest.raises(ValueError, match=r"include cycle: x.lua -> y.lua -> x.lua"):
        lua_source(tmp_path / "x.lua")
    (tmp_path / "z.lua").write_text("--! include nowhere.lua\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.lua \(included by .*z.lua\)"):
        lua_source(tmp_path / "z.lua")
