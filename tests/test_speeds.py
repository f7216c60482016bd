"""The one check of per-replica speeds (``core/speeds.py``) and the settings that use it."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from core.speeds import check_speeds
from devstack.stack_settings import StackSettings
from loadtests.bench_settings import BenchSettings
from loadtests.bench_settings import DecisionSettings as RoutingBenchSettings


def test_empty_is_uniform_and_values_pass_through() -> None:
    assert check_speeds([], 3) == [1.0, 1.0, 1.0]
    assert check_speeds([1.0, 0.5], 2) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("speeds", "message"),
    [
        ([1.0], "1 speeds for 2 replicas"),
        ([1.0, 0.0], "finite and > 0"),
        ([1.0, -1.0], "finite and > 0"),
        ([1.0, math.inf], "finite and > 0"),
        ([1.0, math.nan], "finite and > 0"),
    ],
)
def test_bad_speeds_are_named(speeds: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_speeds(speeds, 2)


@pytest.mark.parametrize("settings", [StackSettings, BenchSettings, RoutingBenchSettings])
def test_every_settings_class_uses_it(settings: type) -> None:
    with pytest.raises(ValidationError, match="every speed must be finite and > 0"):
        settings(replicas=2, speeds=[1.0, math.inf])
