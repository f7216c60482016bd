"""Reading aiperf's summary (loadtests/aiperf_compare.py): the fixture is a real
``profile_export_aiperf.json`` written by aiperf 0.13.0 against the stand-in fleet (trimmed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtests.aiperf_compare import Figures, aiperf_figures, render

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "aiperf_profile_export_aiperf.json"


def test_aiperf_summary_is_read_in_milliseconds(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "profile_export_aiperf.json")
    f = aiperf_figures(tmp_path)
    assert (f.ok, f.errors) == (172, 8)  # the 503s of the admission are aiperf's errors
    assert f.ttft_p50_ms == pytest.approx(4939.63, abs=0.01)
    assert f.ttft_p95_ms == pytest.approx(7876.58, abs=0.01)
    assert f.itl_p50_ms == pytest.approx(138.71, abs=0.01)
    assert f.goodput_rps == pytest.approx(2.406, abs=0.001)


def test_the_table_sets_the_clients_side_by_side() -> None:
    a = Figures(1000.0, 2000.0, 100.0, 2.0, 90, 10)
    o = Figures(800.0, 2500.0, 80.0, 2.1, 95, 5)
    text = render({"triage": {"aiperf": a, "ours": o}})
    assert "aiperf / ours: TTFT p50 1.25x  p95 0.80x  ITL 1.25x" in text
