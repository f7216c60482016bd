"""``triage up`` supervises its processes and protects its Redis.

Unit tests of the backoff policy and the supervisor loop (fake parts, fake clock), of the Redis
ACL rules; then one real stack (``triage up``, 2 replicas, no proxy) shared by the module: a
SIGKILLed replica and a SIGKILLed sidecar come back on their ports, Redis refuses a client
without the password, the sidecar user may publish replica state but not write a key record,
the proxy user may not write a key record either; last, SIGHUP stops it all.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from test_stack_cli import (
    assert_nothing_left,
    descendants,
    kill_leftovers,
    pid_alive,
    record,
    shm_segments,
    start_up,
    wait_for,
)

from core.keyschema import KeySchema
from core.lua import lua_source
from core.process import StartCancelled, StartError
from devstack.redis_launcher import (
    PROXY_USER,
    SIDECAR_USER,
    key_kinds,
    proxy_rules,
    sidecar_rules,
)
from devstack.supervisor import BackoffPolicy, Supervisor
from sidecar.service import PUBLISH, PUBLISH_LUA

# ---------------------------------------------------------------------------------------------
# the policy and the loop


def test_backoff_doubles_from_one_second_up_to_thirty() -> None:
    policy = BackoffPolicy()
    assert [policy.delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError):
        policy.delay_s(0)


def test_backoff_run_resets_after_the_part_stayed_up() -> None:
    policy = BackoffPolicy(reset_after_s=60)
    assert policy.failures_after_crash(0, uptime_s=0.5) == 1
    assert policy.failures_after_crash(4, uptime_s=59.9) == 5
    assert policy.failures_after_crash(4, uptime_s=60.0) == 1


@dataclass
class FakePart:
    up: bool = True
    fail_next: int = 0
    restarts: int = 0

    def alive(self) -> bool:
        return self.up

    def exit_status(self) -> str:
        return "killed by SIGKILL"

    def restart(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise StartError("replica not ready after 1 s")
        self.restarts += 1
        self.up = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_supervisor_restarts_after_the_backoff_and_doubles_it_on_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    part, other = FakePart(), FakePart()
    restarted: list[str] = []
    supervisor = Supervisor(
        {"tritonserver[replica-0]": part, "sidecar[replica-0]": other},
        clock=clock,
        on_restart=restarted.append,
    )
    supervisor.check()
    assert part.restarts == 0
    part.up, part.fail_next = False, 1
    clock.now += 10
    supervisor.check()  # noticed: restart due in 1 s
    assert "tritonserver[replica-0] crashed (killed by SIGKILL)" in caplog.text
    assert "restart in 1.0 s" in caplog.text
    clock.now += 0.9
    supervisor.check()
    assert part.restarts == 0
    clock.now += 0.2
    supervisor.check()  # the restart fails: next try in 2 s
    assert part.restarts == 0 and "next try in 2.0 s" in caplog.text
    clock.now += 1.9
    supervisor.check()
    assert part.restarts == 0
    clock.now += 0.2
    supervisor.check()
    assert part.restarts == 1 and part.up
    assert restarted == ["tritonserver[replica-0]"]
    assert supervisor.restarts == {"tritonserver[replica-0]": 1, "sidecar[replica-0]": 0}
    # a crash soon after: the run goes on (3rd failure: 4 s); after a long uptime it resets
    part.up = False
    clock.now += 5
    supervisor.check()
    assert "restart in 4.0 s (failure 3 in a row)" in caplog.text
    clock.now += 4
    supervisor.check()
    part.up = False
    clock.now += 61
    supervisor.check()
    assert "restart in 1.0 s (failure 1 in a row)" in caplog.text
    assert other.restarts == 0


def test_supervisor_lets_a_cancelled_restart_through() -> None:
    class Cancelled(FakePart):
        def restart(self) -> None:
            raise StartCancelled("stopping")

    clock = Clock()
    supervisor = Supervisor({"x": Cancelled(up=False)}, clock=clock)
    supervisor.check()
    clock.now += 1
    with pytest.raises(StartCancelled):
        supervisor.check()


def test_acl_rules_name_the_schema_keys() -> None:
    rules = sidecar_rules("triage:", (7, 0, 15))
    keys = KeySchema("triage:")
    assert f"~{keys.replica('*')}" in rules and f"~{keys.server('*')}" in rules
    assert not any(keys.api_key("") in rule for rule in rules)
    assert "-@all" in rules and "+evalsha" in rules and "+hset" in rules
    proxy = proxy_rules("triage:", (7, 0, 15))
    assert "%R~triage:*" in proxy and f"~{keys.inflight('*')}" in proxy
    assert f"~{keys.api_key('*')}" in proxy and f"~{keys.api_keys()}" in proxy
    assert len([r for r in proxy if r.startswith("~")]) == len(key_kinds())
    # a prefix with glob characters is matched literally; before 7.0 no read-only selector
    assert "~a\\*b:replica:*" in sidecar_rules("a*b:", (6, 2, 0))
    assert "~triage:*" in proxy_rules("triage:", (6, 0, 0))


# ---------------------------------------------------------------------------------------------
# one real stack


@dataclass
class RunningStack:
    proc: subprocess.Popen[str]
    workdir: Path
    seen: dict[int, str] = field(default_factory=dict)
    """Every process of the stack seen so far, and the shm prefixes: killed at teardown if a
    failed test left them."""
    shm_prefixes: set[str] = field(default_factory=set)

    def state(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.workdir / "stack.json").read_text())
        self.seen.update(descendants(self.proc.pid))
        self.shm_prefixes |= {r["shm_prefix"] for r in info["replicas"].values()}
        return info

    def output(self) -> str:
        return (self.workdir.parent / "up.log").read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    workdir = tmp_path_factory.mktemp("supervised") / "stack"
    proc = start_up(workdir, "--replicas", "2", "--proxies", "0", "--poll-interval-ms", "100")
    running = RunningStack(proc, workdir)
    try:
        wait_for(lambda: (workdir / "stack.json").exists() or proc.poll() is not None, 120, "up")
        assert proc.poll() is None, running.output()
        running.state()
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        kill_leftovers(workdir, running.seen, sorted(running.shm_prefixes))


def wait_until_changed(
    stack: RunningStack, read: Callable[[dict[str, Any]], object], old: object, timeout_s: float
) -> dict[str, Any]:
    """The stack's state once ``read(state)`` differs from ``old`` (rewritten on restart)."""
    found: dict[str, Any] = {}

    def changed() -> bool:
        try:
            found.update(stack.state())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return read(found) != old

    wait_for(changed, timeout_s, "stack.json updated")
    return found


def generate(triton_url: str, model: str) -> int:
    response = httpx.post(
        f"{triton_url}/v2/models/{model}/generate",
        json={"text_input": "hi", "max_tokens": 2},
        timeout=30,
    )
    return response.status_code


@pytest.mark.integration
def test_sigkilled_replica_is_restarted_on_its_port(stack: RunningStack) -> None:
    before = stack.state()
    replica = before["replicas"]["replica-0"]
    stubs = [pid for pid in descendants(replica["pid"]) if pid != replica["pid"]]
    segments = shm_segments(replica["shm_prefix"])
    assert stubs and segments, "a running replica has a python stub and shared memory"
    killed = time.monotonic()
    subprocess.run(["kill", "-KILL", str(replica["pid"])], check=True)
    after = wait_until_changed(
        stack, lambda s: s["replicas"]["replica-0"]["pid"], replica["pid"], 40
    )
    new = after["replicas"]["replica-0"]
    assert (
        new["triton_url"] == replica["triton_url"] and new["sidecar_url"] == replica["sidecar_url"]
    )
    assert generate(new["triton_url"], after["model"]) == 200
    record("replica_restart_after_sigkill_s", round(time.monotonic() - killed, 2))
    assert not [pid for pid in stubs if pid_alive(pid)], "the dead server's stub is gone"
    assert not set(segments) & set(shm_segments(replica["shm_prefix"])), "its shm is gone"
    # its sidecar sees it again and publishes it healthy
    client = redis.Redis.from_url(after["redis_url"])
    try:
        wait_for(
            lambda: (
                client.hget(KeySchema(after["key_prefix"]).replica("replica-0"), "state")
                == b"healthy"
            ),
            10,
            "replica-0 published healthy",
        )
    finally:
        client.close()
    log = stack.output()
    assert "tritonserver[replica-0] crashed (killed by SIGKILL)" in log
    assert "restart in 1.0 s (failure 1 in a row)" in log
    assert "tritonserver[replica-0] restarted" in log


@pytest.mark.integration
def test_sigkilled_sidecar_is_restarted_on_its_port(stack: RunningStack) -> None:
    before = stack.state()["replicas"]["replica-1"]
    killed = time.monotonic()
    subprocess.run(["kill", "-KILL", str(before["sidecar_pid"])], check=True)
    after = wait_until_changed(
        stack, lambda s: s["replicas"]["replica-1"]["sidecar_pid"], before["sidecar_pid"], 30
    )
    assert after["replicas"]["replica-1"]["sidecar_url"] == before["sidecar_url"]
    body = httpx.get(f"{before['sidecar_url']}/healthz", timeout=5).json()
    assert body["publishing"] and body["replica_state"] == "healthy"
    record("sidecar_restart_after_sigkill_s", round(time.monotonic() - killed, 2))


def raw_command(url: str, *words: str) -> bytes:
    """One RESP command on a fresh connection, no AUTH: the server's first reply line."""
    host_port = url.split("@")[-1].removeprefix("redis://").split("/")[0]
    host, port = host_port.rsplit(":", 1)
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(payload.encode())
        return sock.recv(1024).split(b"\r\n")[0]


@pytest.mark.integration
def test_redis_refuses_a_client_without_the_password(stack: RunningStack) -> None:
    info = stack.state()
    record_key = KeySchema(info["key_prefix"]).api_key("0" * 64)
    assert raw_command(info["redis_url"], "HSET", record_key, "alias", "x").startswith(b"-NOAUTH")
    client = redis.Redis.from_url(info["redis_url"])
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.integration
def test_sidecar_user_publishes_replica_state_but_writes_no_key_record(
    stack: RunningStack,
) -> None:
    info = stack.state()
    keys = KeySchema(info["key_prefix"])
    record_key = keys.api_key("0" * 64)
    sidecar = redis.Redis.from_url(info["redis_users"][SIDECAR_USER])
    admin = redis.Redis.from_url(info["redis_url"])
    try:
        publish = sidecar.register_script(lua_source(PUBLISH_LUA, PUBLISH))
        fields = ["replica_id", "acl-probe", "state", "healthy"]
        written = publish(
            keys=PUBLISH.keys_for(
                replica=keys.replica("acl-probe"),
                replicas=keys.model_replicas("acl"),
                server=keys.server("acl-probe"),
            ),
            args=PUBLISH.argv(
                [*fields, "healthy", "1"],
                poll_started_ms=int(time.time() * 1000),
                ttl_ms=2000,
                replica_id="acl-probe",
                replica_fields=len(fields),
            ),
        )
        assert written == 1
        assert admin.hget(keys.replica("acl-probe"), "state") == b"healthy"
        with pytest.raises(redis.exceptions.NoPermissionError):
            sidecar.hset(record_key, "alias", "forged")
        with pytest.raises(redis.exceptions.NoPermissionError):  # a declared key: refused at once
            sidecar.eval("return redis.call('HSET', KEYS[1], 'alias', 'forged')", 1, record_key)
        # a key the script does not declare is checked when the script touches it
        with pytest.raises(redis.exceptions.ResponseError, match=r"can't access at least one"):
            sidecar.eval(
                f"return redis.call('HSET', '{record_key}', 'alias', 'forged')",
                1,
                keys.replica("acl-probe"),
            )
        with pytest.raises(redis.exceptions.NoPermissionError):
            sidecar.keys("*")
        assert admin.exists(record_key) == 0
    finally:
        admin.delete(
            keys.replica("acl-probe"), keys.server("acl-probe"), keys.model_replicas("acl")
        )
        sidecar.close()
        admin.close()


@pytest.mark.integration
def test_proxy_user_keeps_to_the_schema_and_runs_no_admin_command(stack: RunningStack) -> None:
    """The proxy user writes the schema's keys (the key store too: it serves LiteLLM's key
    routes to the master key), reads the rest of the prefix, and nothing else."""
    info = stack.state()
    keys = KeySchema(info["key_prefix"])
    record_key = keys.api_key("1" * 64)
    outside_schema = f"{info['key_prefix']}not-a-kind"
    proxy = redis.Redis.from_url(info["redis_users"][PROXY_USER])
    admin = redis.Redis.from_url(info["redis_url"])
    try:
        admin.hset(record_key, "alias", "real")
        assert proxy.hget(record_key, "alias") == b"real"
        assert proxy.hset(record_key, "models", "[]") == 1
        admin.set(outside_schema, "x")
        assert proxy.get(outside_schema) == b"x"
        with pytest.raises(redis.exceptions.NoPermissionError):
            proxy.set(outside_schema, "forged")
        with pytest.raises(redis.exceptions.NoPermissionError):
            proxy.set("elsewhere:key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            proxy.config_get("requirepass")
        assert proxy.zadd(keys.inflight("acl-probe"), {"r1": 1}) == 1
    finally:
        admin.delete(record_key, keys.inflight("acl-probe"), outside_schema)
        proxy.close()
        admin.close()


@pytest.mark.integration
def test_sighup_stops_everything_restarted_processes_included(stack: RunningStack) -> None:
    info = stack.state()
    tree = descendants(stack.proc.pid)
    prefixes = [r["shm_prefix"] for r in info["replicas"].values()]
    assert len(tree) >= 6  # redis, 2 tritonservers, their stubs, 2 sidecars
    began = time.monotonic()
    stack.proc.send_signal(signal.SIGHUP)
    stack.proc.wait(timeout=60)
    record("stop_after_sighup_s", round(time.monotonic() - began, 2))
    out = stack.output()
    assert stack.proc.returncode == 0, out
    assert "SIGHUP: stopping the stack" in out
    assert_nothing_left(tree, prefixes, stack.workdir)
