"""``triage up`` (the README's first command) starts the stack and leaves nothing behind: on
SIGTERM (with a proxy), SIGINT, and a signal during start-up (SIGHUP: test_stack_supervision)
every process stops, python stubs included, no ``/dev/shm`` segment and no ``stack.json`` stay,
and Redis wants its password."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from core.keyschema import KeySchema, ReplicaState

pytestmark = pytest.mark.integration


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2 :].split()


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Running and not a zombie (a zombie still answers kill(0): gone for our purposes); with
    ``started`` (its start time) also the same process, not a later one with the pid reused."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and started in (None, fields[19])


def descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (children, their children: Triton's python stubs), as
    pid -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(pid)
            started[pid] = fields[19]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def shm_segments(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}*"))


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.1)


def record(name: str, value: object) -> None:
    """Figures for the closing note: appended to $TRIAGE_FIGURES if set."""
    print(f"FIGURE {name} = {value}")
    if path := os.environ.get("TRIAGE_FIGURES"):
        with open(path, "a") as out:
            out.write(json.dumps({name: value}) + "\n")


def kill_leftovers(workdir: Path, processes: dict[int, str], shm_prefixes: list[str]) -> None:
    """SIGKILL whatever of a stack survived and remove its shm, so that a failed test leaks
    nothing on a shared host (a no-op when the stack stopped as it should)."""
    found = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    alive = {int(pid) for pid in found.stdout.split()}
    alive |= {pid for pid, started in processes.items() if pid_alive(pid, started)}
    for pid in alive:
        try:
            group = os.getpgid(pid)
            if group == os.getpgrp():  # ``triage up`` itself shares the test's group
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            continue  # gone meanwhile
    for prefix in shm_prefixes:
        for segment in shm_segments(prefix):
            Path("/dev/shm", segment).unlink(missing_ok=True)


def assert_nothing_left(processes: dict[int, str], shm_prefixes: list[str], workdir: Path) -> None:
    """After ``triage up`` exited: none of its processes, shm segments or secrets remain."""
    try:
        assert not [pid for pid, started in processes.items() if pid_alive(pid, started)]
        leftovers = subprocess.run(
            ["pgrep", "-f", str(workdir)], capture_output=True, text=True
        ).stdout.split()
        assert leftovers == []
        assert shm_prefixes and all(shm_segments(prefix) == [] for prefix in shm_prefixes)
        assert not (workdir / "stack.json").exists(), "stack.json (master key) removed on stop"
        assert not list(workdir.glob("redis-*.conf")), "the Redis config (passwords) removed"
    finally:
        kill_leftovers(workdir, processes, shm_prefixes)


def start_up(workdir: Path, *args: str) -> subprocess.Popen[str]:
    """``triage up`` as the user runs it; its output in ``workdir``/../up.log."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / "up.log", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "triage.cli", "up", *args, "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def test_up_starts_fleet_and_sigterm_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "stack"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "triage.cli",
            "up",
            "--replicas",
            "2",
            "--speeds",
            "1.0,0.5",
            "--poll-interval-ms",
            "100",
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state_file = workdir / "stack.json"
        deadline = time.monotonic() + 150
        while not state_file.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        assert state_file.stat().st_mode & 0o777 == 0o600
        info = json.loads(state_file.read_text())
        assert [r["speed"] for r in info["replicas"].values()] == [1.0, 0.5]
        # Redis wants the password (in stack.json); the sidecars and proxies have their users
        port = int(info["redis_url"].rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, protocol=2).ping()
        client = redis.Redis.from_url(info["redis_url"])
        keys = KeySchema(info["key_prefix"])
        time.sleep(0.3)
        for replica_id, replica in info["replicas"].items():
            state = ReplicaState.from_redis(client.hgetall(keys.replica(replica_id)))
            assert state.healthy and state.api_base == replica["triton_url"]
            response = httpx.post(
                f"{replica['triton_url']}/v2/models/{info['model']}/generate",
                json={"text_input": "hi", "max_tokens": 3},
                timeout=30,
            )
            assert response.status_code == 200
        client.close()
        # the proxy in front (as the proxy user), with a fresh key: an OpenAI SDK call goes through
        from openai import OpenAI

        sdk = OpenAI(base_url=f"{info['base_url']}/v1", api_key=info["api_key"], max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(
            model=info["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-litellm-model-id"] in info["replicas"]
        # the embedded default lists a catalogued model that is loaded nowhere; the first
        # request for it loads it on a replica (Triton's explicit model control)
        (cold,) = info["catalogue"]
        states = {m.id: m.model_extra["state"] for m in sdk.models.list().data}  # type: ignore[index]
        assert states == {info["model"]: "loaded", cold: "available"}
        raw = sdk.chat.completions.with_raw_response.create(
            model=cold, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-litellm-model-id"] in {f"{rid}.{cold}" for rid in info["replicas"]}
        assert {m.id: m.model_extra["state"] for m in sdk.models.list().data}[cold] == "loaded"  # type: ignore[index]
        pids = [r["pid"] for r in info["replicas"].values()]
        sidecars = [r["sidecar_url"] for r in info["replicas"].values()]
        tree = descendants(proc.pid)
    finally:
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    record("stop_after_sigterm_with_proxy_s", round(time.monotonic() - began, 2))
    assert proc.returncode == 0, out
    assert "triage stack ready" in out
    assert f"base URL  {info['base_url']}/v1" in out
    assert f"API key   {info['api_key']}" in out
    assert f"catalogue {cold!r}: listed by /v1/models, not loaded" in out
    assert info["redis_url"].split("@")[0] not in out, "the Redis password is not printed"
    assert not [pid for pid in pids if pid_alive(pid)]
    assert_nothing_left(tree, [r["shm_prefix"] for r in info["replicas"].values()], workdir)
    for url in sidecars:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_sigint_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "stack"
    proc = start_up(workdir, "--replicas", "1", "--proxies", "0")
    try:
        wait_for(lambda: (workdir / "stack.json").exists() or proc.poll() is not None, 120, "up")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        info = json.loads((workdir / "stack.json").read_text())
        tree = descendants(proc.pid)
        assert len(tree) >= 4  # redis, tritonserver, its python stub, sidecar
        assert all(shm_segments(r["shm_prefix"]) for r in info["replicas"].values())
    finally:
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    record("stop_after_sigint_s", round(time.monotonic() - began, 2))
    assert proc.returncode == 0, (tmp_path / "up.log").read_text()
    assert_nothing_left(tree, [r["shm_prefix"] for r in info["replicas"].values()], workdir)


def test_sigterm_during_start_up_stops_at_once(tmp_path: Path) -> None:
    workdir = tmp_path / "stack"
    proc = start_up(workdir, "--replicas", "1", "--proxies", "0")
    tree: dict[int, str] = {}
    try:  # the replica is starting (its log exists), not yet ready
        wait_for(lambda: (workdir / "triton-replica-0.log").exists(), 60, "replica starting")
        tree = descendants(proc.pid)
        assert not (workdir / "stack.json").exists()
    finally:
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    record("stop_during_start_up_s", round(time.monotonic() - began, 2))
    log = (tmp_path / "up.log").read_text()
    assert proc.returncode == 0, log
    assert "start cancelled" in log or "not started: the stack is stopping" in log, log
    prefixes = sorted(
        {
            line.split("shm-region-prefix-name=")[1].split()[0]
            for line in log.splitlines()
            if "shm-region-prefix-name=" in line
        }
    )
    assert_nothing_left(tree, prefixes, workdir)


def test_up_with_bad_setting_names_the_field() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "triage.cli", "up", "--replicas", "2", "--speeds", "1.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid setting speeds" in done.stderr
