"""sidecar.tp_launcher: the exact mpirun leader-mode command lines and the sidecar settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.service import load_settings as load_sidecar_settings
from sidecar.tp_launcher import (
    TpReplicaSettings,
    launch_argv,
    main,
    rank_args,
    sidecar_argv,
    sidecar_settings,
)

REPO = Path("/engines/llama-tp/triton_repo")
SERVER = "/opt/tritonserver/bin/tritonserver"


def tp_settings(world_size: int, **kw: object) -> TpReplicaSettings:
    return TpReplicaSettings(replica_id="a", repository=REPO, world_size=world_size, **kw)  # type: ignore[arg-type]


def rank(r: int) -> list[str]:
    """What rank r of replica "a" runs with the default ports (8000/8001/8002, stride 10)."""
    args = [
        SERVER,
        f"--model-repository={REPO}",
        f"--http-port={8000 + 10 * r}",
        f"--grpc-port={8001 + 10 * r}",
        f"--metrics-port={8002 + 10 * r}",
    ]
    if r:
        args += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
    return [
        *args,
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name=a_rank{r}_",
        "--log-verbose=0",
    ]


def test_tp1_command() -> None:
    assert launch_argv(tp_settings(1)) == ["mpirun", "--allow-run-as-root", "-n", "1", *rank(0)]


def test_tp2_command() -> None:
    assert launch_argv(tp_settings(2)) == [
        "mpirun", "--allow-run-as-root",
        "-n", "1", *rank(0),
        ":",
        "-n", "1", *rank(1),
    ]  # fmt: skip


def test_tp4_command() -> None:
    argv = launch_argv(tp_settings(4))
    assert argv == [
        "mpirun", "--allow-run-as-root",
        "-n", "1", *rank(0), ":",
        "-n", "1", *rank(1), ":",
        "-n", "1", *rank(2), ":",
        "-n", "1", *rank(3),
    ]  # fmt: skip
    ports = [
        a for a in argv if a.startswith("--") and a.endswith(tuple("0123456789")) and "port" in a
    ]
    assert len(ports) == len(set(ports)) == 12  # every rank on ports of its own
    prefixes = [a for a in argv if "shm-region-prefix-name" in a]
    assert len(set(prefixes)) == 4


def test_ports_prefix_and_binaries_configurable() -> None:
    s = tp_settings(
        2,
        http_port=9000,
        grpc_port=9001,
        metrics_port=9002,
        rank_port_stride=100,
        shm_prefix="x_",
        tritonserver="tritonserver",
        mpirun="/usr/bin/mpirun",
        log_verbose=1,
    )
    argv = launch_argv(s)
    assert argv[0] == "/usr/bin/mpirun"
    assert "--http-port=9100" in rank_args(s, 1) and "--metrics-port=9102" in rank_args(s, 1)
    assert "--backend-config=python,shm-region-prefix-name=x_rank1_" in argv
    assert "--log-verbose=1" in argv


def test_llmapi_is_one_tritonserver() -> None:
    s = tp_settings(1, serving="llmapi", max_active=64)
    assert launch_argv(s) == rank(0)
    assert s.routed_model == "tensorrt_llm"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"serving": "llmapi"}, "max_active is required on the LLM-API path"),
        ({"serving": "llmapi", "max_active": 8, "world_size": 2}, "tensor_parallel_size lives in"),
        ({"world_size": 64, "http_port": 65000}, "rank ports exceed 65535"),
        ({"replica_id": "bad id"}, "String should match pattern"),
    ],
)
def test_invalid_launch_settings(kw: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"replica_id": "a", "repository": REPO}
    with pytest.raises(ValidationError, match=message):
        TpReplicaSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_sidecar_for_the_engine_path() -> None:
    sidecar = sidecar_settings(tp_settings(2, host="10.0.0.5", redis_url="redis://r:6379/0"))
    assert (sidecar.model, sidecar.engine_model) == ("ensemble", "tensorrt_llm")
    assert sidecar.triton_url == "http://10.0.0.5:8000"
    assert sidecar.metrics_url == "http://10.0.0.5:8002/metrics"  # rank 0's metrics
    assert sidecar.api_base == "http://10.0.0.5:8000"
    assert sidecar.max_active is None  # nv_trt_llm_request_metrics{request_type="max"} says
    assert sidecar.redis_url == "redis://r:6379/0"


def test_sidecar_for_the_llmapi_path() -> None:
    sidecar = sidecar_settings(tp_settings(1, serving="llmapi", max_active=32))
    # the LLM-API model exports no nv_trt_llm_* gauges and has no preprocessing step: the
    # sidecar reads Triton's counters of the routed model and the configured slots
    assert (sidecar.model, sidecar.engine_model, sidecar.arrivals_model, sidecar.max_active) == (
        "tensorrt_llm",
        None,
        None,
        32,
    )


@pytest.mark.parametrize("serving", ["engine", "llmapi"])
def test_sidecar_argv_parses_to_the_same_settings(serving: str) -> None:
    s = tp_settings(1, serving=serving, max_active=16, sidecar_port=9555)
    argv = sidecar_argv(s, python="python3")
    assert argv[:3] == ["python3", "-m", "sidecar.service"]
    assert load_sidecar_settings(argv[3:]) == sidecar_settings(s)


def test_main_print_only(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--replica-id", "a", "--repository", str(REPO), "--world-size", "2", "--print-only"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "triton:  mpirun --allow-run-as-root -n 1 /opt/tritonserver/bin/tritonserver"
    )
    assert " : -n 1 " in out and "sidecar: " in out and "--engine-model tensorrt_llm" in out


def test_main_invalid_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--replica-id", "a", "--repository", str(REPO), "--serving", "llmapi"]) == 2
    assert "tp_launcher: invalid setting" in capsys.readouterr().err
