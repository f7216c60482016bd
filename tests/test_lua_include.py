"""``--! include`` in the Lua scripts: expanded once per line, relative to the including file."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.admission.gate import GATE_LUA
from plugins.routing.store import PICK_LUA
from triage.lua import lua_source


def test_gate_and_pick_share_the_pick_library_text() -> None:
    library = (PICK_LUA.parent / "pick_lib.lua").read_text().rstrip("\n")
    for script in (GATE_LUA, PICK_LUA):
        text = lua_source(script)
        assert not any(line.startswith("--! include") for line in text.splitlines())
        assert text.count(library) == 1
        assert text.count("local function pick_replica(") == 1


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
