"""``triage up`` (the README's first command) starts the stack and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from triage.keyschema import KeySchema, ReplicaState

pytestmark = pytest.mark.integration


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


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
        info = json.loads(state_file.read_text())
        assert [r["speed"] for r in info["replicas"].values()] == [1.0, 0.5]
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
        # the proxy in front, with a fresh key: an OpenAI SDK call goes through
        from openai import OpenAI

        sdk = OpenAI(base_url=f"{info['base_url']}/v1", api_key=info["api_key"], max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(
            model=info["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-litellm-model-id"] in info["replicas"]
        pids = [r["pid"] for r in info["replicas"].values()]
        sidecars = [r["sidecar_url"] for r in info["replicas"].values()]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "triage stack ready" in out
    assert f"base URL  {info['base_url']}/v1" in out
    assert f"API key   {info['api_key']}" in out
    assert not [pid for pid in pids if pid_alive(pid)]
    leftovers = subprocess.run(
        ["pgrep", "-f", str(workdir)], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == []
    for url in sidecars:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_up_with_bad_setting_names_the_field() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "triage.cli", "up", "--replicas", "2", "--speeds", "1.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid setting speeds" in done.stderr
