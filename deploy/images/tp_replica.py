"""Entrypoint of the GPU replica image (``triton-trtllm.Dockerfile``): one tensor-parallel
TensorRT-LLM replica in Triton, launched exactly as ``sidecar/tp_launcher.py`` launches it.

The command line is ``sidecar.tp_launcher.launch_argv``: on the engine path ``mpirun
--allow-run-as-root -n 1 tritonserver <rank 0> : -n 1 tritonserver <rank 1> ...``, one rank per
GPU (leader mode; ranks > 0 load only ``tensorrt_llm`` on ports of their own); on the LLM-API path
one ``tritonserver``. It is exec'd (no waiting parent), so the pod's SIGTERM reaches ``mpirun``
directly. The load sidecar runs in its own container of the pod, with the settings
``tp_launcher.sidecar_settings`` would give it (``tests/test_deploy_kubernetes.py`` holds the
manifests to that).

Settings: ``TRIAGE_TP_*`` (``TpReplicaSettings``: ``REPLICA_ID``, ``REPOSITORY``,
``WORLD_SIZE``, ``SERVING``, ...). A bad value exits 2 naming the field.
"""

from __future__ import annotations

import os
import shlex
import sys

from pydantic import ValidationError

from core.settings_errors import report_invalid
from sidecar.tp_launcher import TpReplicaSettings, launch_argv


def main() -> int:
    try:
        settings = TpReplicaSettings()
    except ValidationError as exc:
        return report_invalid("tp_replica", exc)
    argv = launch_argv(settings)
    print(f"triton: {shlex.join(argv)}", flush=True)
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
