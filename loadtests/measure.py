"""Measuring helpers shared by the benchmarks: percentiles, CPU time from ``/proc``, strict JSON.

Pure standard library (no Locust, no LiteLLM): the Locust files, ``triage bench`` and
``triage bench decisions`` all use it.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENTS = "clients (this process)"
REST = "rest of the machine"
STOLEN = "stolen by the hypervisor"


def percentile(values: Sequence[float], q: float) -> float:
    """``statistics.quantiles`` at ``q`` % (1..99, inclusive method: never beyond the max seen);
    NaN for no values. Fractional ``q`` (99.9) interpolates between the integer cut points."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    if not 0 < q < 100:
        raise ValueError(f"percentile q must be in (0, 100), got {q}")
    if float(q).is_integer():
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_standard_error(values: Sequence[float]) -> float:
    """Standard error of the median, distribution-free: half the width of the order-statistic
    95 % interval of the median (ranks n/2 -+ 1.96 sqrt(n)/2) over 2 x 1.96. NaN below 4."""
    n = len(values)
    if n < 4:
        return float("nan")
    ordered = sorted(values)
    half = 1.96 * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half))
    high = min(n - 1, math.ceil(n / 2 + half))
    return (ordered[high] - ordered[low]) / (2 * 1.96)


def group_cpu_s(pgids: Sequence[int]) -> float:
    """CPU seconds (user + system) of the live processes in these process groups."""
    wanted = set(pgids)
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields from 3 (state): ppid(4) pgrp(5) ... utime(14) stime(15), 1-based as in proc(5)
        if len(fields) > 12 and int(fields[2]) in wanted:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores summed."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal (guest time is inside user/nice)
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def machine_stolen_s() -> float:
    """CPU seconds the hypervisor ran something else while this machine wanted its CPUs
    (``steal`` in ``/proc/stat``, all cores summed): a virtual machine on a busy host."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / CLK_TCK


def machine_busy_cores(seconds: float = 1.0) -> float:
    """How many cores the whole machine kept busy over the next ``seconds`` (blocks)."""
    busy0, total0 = machine_busy_s()
    time.sleep(seconds)
    busy1, total1 = machine_busy_s()
    if total1 <= total0:
        return float("nan")
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


NOISY_LOGGERS = ("httpx", "gateway", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def bench_logging() -> None:
    """INFO to stderr for the benchmark's own lines; the stack's chatty loggers at WARNING."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class CpuGroups:
    """Processes by role, as process groups (each ManagedProcess leads its own)."""

    groups: dict[str, list[int]]

    def sample(self) -> dict[str, float]:
        out = {role: group_cpu_s(pgids) for role, pgids in self.groups.items()}
        out[CLIENTS] = time.process_time()
        out["machine"] = machine_busy_s()[0]
        out[STOLEN] = machine_stolen_s()
        return out


def cpu_cores(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores used per role over ``wall_s``; the machine's busy time not in any role is REST."""
    used = {role: (after[role] - before[role]) / wall_s for role in before}
    machine = used.pop("machine")
    stolen = used.pop(STOLEN, 0.0)  # counted in the machine's busy time, in no process
    used[REST] = max(0.0, machine - stolen - sum(used.values()))
    used["machine busy"] = machine
    used[STOLEN] = stolen
    return used


def histogram_quantile(buckets: Mapping[float, float], q: float) -> float:
    """Prometheus-style quantile (0..1) of a cumulative histogram ``{upper bound: count}``
    (``+Inf`` included), linear inside the bucket as PromQL's ``histogram_quantile``; NaN when
    empty. Beyond the last finite bound it answers that bound (PromQL does the same)."""
    bounds = sorted(buckets)
    if not bounds:
        return float("nan")
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def jsonable(value: Any) -> Any:
    """NaN / inf (an empty sample) become null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when undefined (theirs 0 or missing), 1.0 when both are 0."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (ours, theirs)):
        return float("nan")
    if theirs == 0:
        return 1.0 if ours == 0 else float("nan")
    return ours / theirs


def fmt_ratio(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"
