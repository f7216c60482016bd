"""The catalogue's pure parts: the file's validation, feasibility, and where a load goes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.keyschema import ServerState
from plugins.catalogue.placement import (
    Load,
    LoadedModel,
    LoadFailed,
    ServerView,
    Unavailable,
    Unplaceable,
    decide,
    evictions,
    infeasibility,
)
from plugins.catalogue.settings import Catalogue, CatalogueModel


def topology(server_id: str, devices: int = 1, memory_mb: int = 16_000) -> ServerState:
    return ServerState(
        server_id=server_id,
        api_base="http://x:8000",
        device_count=devices,
        device_memory_mb=memory_mb,
        healthy=True,
        ts_ms=0,
    )


def view(server_id: str, **kw: object) -> ServerView:
    devices = int(kw.pop("devices", 1))  # type: ignore[call-overload]
    memory = int(kw.pop("memory_mb", 16_000))  # type: ignore[call-overload]
    return ServerView(
        server_id=server_id,
        topology=topology(server_id, devices, memory),
        healthy=bool(kw.pop("healthy", True)),
        **kw,  # type: ignore[arg-type]
    )


MODEL = CatalogueModel(triton_model="m")


def test_catalogue_file_names_the_bad_reference() -> None:
    doc = {
        "servers": {"a": {"api_base": "http://a:8000"}},
        "models": {"m": {"triton_model": "m", "pinned_on": ["b"]}},
    }
    with pytest.raises(ValidationError, match=r"models.m.pinned_on: unknown servers \['b'\]"):
        Catalogue.model_validate(doc)
    doc["models"] = {"m": {"triton_model": "m", "min_devices": 0}}
    with pytest.raises(ValidationError, match="min_devices"):
        Catalogue.model_validate(doc)
    doc["models"] = {"m": {"triton_model": "m", "servers": ["a"]}}
    assert Catalogue.model_validate(doc).servers_of("m") == ["a"]


def test_feasibility_names_the_numbers() -> None:
    wide = CatalogueModel(triton_model="m", min_devices=2, min_device_memory_mb=40_000)
    assert infeasibility(wide, topology("a", 1, 80_000)) == "needs 2 devices, has 1"
    assert (
        infeasibility(wide, topology("a", 2, 24_000)) == "needs 40000 MiB per device, has 24000 MiB"
    )
    assert infeasibility(wide, topology("a", 4, 80_000)) is None


@pytest.mark.parametrize(
    ("pinned", "servers", "expected"),
    [
        ([], [view("b", load=3), view("a", load=1), view("c", load=1)], "a"),  # least, then id
        (["c"], [view("a"), view("b"), view("c", load=9)], "c"),  # pinned first
        (["c", "b"], [view("a"), view("b"), view("c", healthy=False)], "b"),  # pinned order
        (["a"], [view("a", cooldown_reason="oom"), view("b")], "b"),  # cooling down: skipped
        ([], [view("a", devices=1), view("b", devices=2)], "a"),
    ],
)
def test_load_goes_pinned_first_then_least_loaded(
    pinned: list[str], servers: list[ServerView], expected: str
) -> None:
    model = CatalogueModel(triton_model="m", pinned_on=pinned)
    assert decide(model, servers) == Load(expected)


def test_never_hostable_is_unplaceable_and_down_is_unavailable() -> None:
    wide = CatalogueModel(triton_model="m", min_devices=2)
    decision = decide(wide, [view("a"), view("b")])
    assert isinstance(decision, Unplaceable)
    assert "a: needs 2 devices, has 1" in decision.reason
    assert isinstance(decide(wide, [view("a"), view("big", devices=2, healthy=False)]), Unavailable)
    unreported = ServerView(server_id="new", topology=None, healthy=False)
    assert isinstance(decide(wide, [view("a"), unreported]), Unavailable)  # may be feasible


def test_every_feasible_server_cooling_down_is_load_failed_with_its_reason() -> None:
    decision = decide(MODEL, [view("a", cooldown_reason="weights missing"), view("b", devices=1)])
    assert decision == Load("b")
    decision = decide(MODEL, [view("a", cooldown_reason="weights missing")])
    assert decision == LoadFailed("a", "weights missing")


def test_unloading_frees_room_least_recently_used_idle_first() -> None:
    model = CatalogueModel(triton_model="m", min_device_memory_mb=10_000)
    loaded = (
        LoadedModel("old-busy", 6_000, last_used_ms=1, inflight=2),
        LoadedModel("old-idle", 6_000, last_used_ms=2, inflight=0),
        LoadedModel("new-idle", 6_000, last_used_ms=3, inflight=0),
    )
    server = view("a", memory_mb=20_000, loaded=loaded)  # 2 000 MiB free, 10 000 needed
    assert evictions(model, server) == ("old-idle", "new-idle")
    assert decide(model, [server], unload_lru=True) == Load("a", ("old-idle", "new-idle"))
    full = decide(model, [server], unload_lru=False)  # off by default: the server is skipped
    assert isinstance(full, Unavailable) and "no room on a" in full.reason
    busy = view("a", memory_mb=20_000, loaded=(LoadedModel("x", 18_000, 0, inflight=1),))
    assert evictions(model, busy) is None
