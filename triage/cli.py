"""``triage``: one command for the project. ``triage <command> --help`` for each command."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from pydantic import ValidationError
from pydantic_settings import CliApp

from core.redis_url import redacted
from core.settings_errors import report_invalid

USAGE = """usage: triage <command> [options]

commands:
  up        start the embedded stack on free loopback ports; Ctrl-C stops it all
  sidecar   run the load sidecar for one Triton replica
  keys      manage offline virtual keys (create, list, revoke)
  bench     benchmarks (loadtests/README.md); triage bench <kind> --help:
              compare    LiteLLM's routing vs the triage plugins, same fleet, same arrivals
                         (the default: triage bench --seconds 20 is triage bench compare ...)
              decisions  routing decision time and closed-loop proxy load
              admission  how fast the admission gate says yes and no
              burst      bursts of k x capacity through one proxy: 503 latency, Retry-After, RSS
              fairness   a flooding tenant and steady ones: fair share vs FIFO in a tier, deadlines
              simulate   the fleet simulator (no processes)
  build-engine  plan, build and package a TensorRT-LLM replica (--settings FILE [--dry-run])
  check-replica  what triage will see of a running Triton: models, dialect, queue, metrics (URL)
"""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each stops ``triage up`` cleanly (SIGHUP: the terminal closed)."""

log = logging.getLogger("triage.up")


def say(text: str) -> None:
    """Print to the terminal, which may be gone (after SIGHUP a write fails with EIO)."""
    try:
        print(text, flush=True)
    except OSError as exc:
        log.debug("terminal gone, not shown: %r (%s)", text, exc)


def cmd_up(argv: Sequence[str]) -> int:
    from core.process import StartCancelled, cancel_starts
    from devstack.stack import Stack
    from devstack.stack_settings import StackSettings

    try:
        settings = CliApp.run(StackSettings, cli_args=list(argv))
    except ValidationError as exc:
        return report_invalid("triage up", exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness poll otherwise
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s: stopping the stack", signal.Signals(signum).name)
        stop.set()
        cancel_starts()  # a start or restart under way gives up at once

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    stack = Stack(settings)
    try:
        stack.start()
        info = stack.describe()
        say("\ntriage stack ready")
        if info["base_url"]:
            say(f"  base URL  {info['base_url']}/v1  (OpenAI API, model {info['model']!r})")
            say(f"  API key   {info['api_key']}")
            for url in info["proxy_urls"][1:]:
                say(f"  proxy     {url}")
            for name in info["catalogue"]:
                say(
                    f"  catalogue {name!r}: listed by /v1/models, not loaded; the first request "
                    "for it loads it on a replica (plugins/catalogue/README.md)"
                )
        secret = "  (password in the state file)" if "@" in info["redis_url"] else ""
        say(f"  redis     {redacted(info['redis_url'])}{secret}")
        for rid, replica in info["replicas"].items():
            say(
                f"  {rid}  triton {replica['triton_url']}  speed {replica['speed']}"
                f"  sidecar {replica['sidecar_url']}"
            )
        say(f"  state     {stack.state_path}  (removed on stop)")
        say("Ctrl-C stops everything.")
        if settings.supervise:
            stack.supervisor().run(stop)
        else:
            stop.wait()
    except StartCancelled as exc:  # a signal during start-up or during a restart
        log.info("stopping: %s", exc)
    finally:
        say("stopping...")
        began = time.monotonic()
        stack.stop()
        log.info("stack stopped in %.1f s", time.monotonic() - began)
    return 0


def cmd_sidecar(argv: Sequence[str]) -> int:
    from sidecar.service import main

    return main(argv)


def cmd_keys(argv: Sequence[str]) -> int:
    from plugins.auth.cli import main

    return main(list(argv))


def cmd_build_engine(argv: Sequence[str]) -> int:
    from build_engines.main import main

    return main(list(argv))


def cmd_check_replica(argv: Sequence[str]) -> int:
    from sidecar.check_replica import main

    return main(list(argv))


def _bench_main(kind: str) -> Callable[[list[str]], int]:
    if kind == "compare":
        from loadtests.compare import main
    elif kind == "decisions":
        from loadtests.decisions import main
    elif kind == "admission":
        from loadtests.bench_admission import main
    elif kind == "burst":
        from loadtests.bench_burst import main
    elif kind == "fairness":
        from loadtests.bench_fairness import main
    else:
        from loadtests.simulator.__main__ import main
    return main


BENCH_KINDS = ("compare", "decisions", "admission", "burst", "fairness", "simulate")


def cmd_bench(argv: Sequence[str]) -> int:
    """``triage bench <kind> [options]``; options alone (or none) run ``compare``."""
    args = list(argv)
    kind = "compare"
    if args and not args[0].startswith("-"):
        kind = args.pop(0)
        if kind not in BENCH_KINDS:
            print(
                f"triage bench: unknown kind {kind!r} (one of {', '.join(BENCH_KINDS)})",
                file=sys.stderr,
            )
            return 2
    return _bench_main(kind)(args)


def cmd_bench_burst(argv: Sequence[str]) -> int:
    """The former name of ``triage bench burst``."""
    return cmd_bench(["burst", *argv])


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "up": cmd_up,
    "sidecar": cmd_sidecar,
    "keys": cmd_keys,
    "bench": cmd_bench,
    "bench-burst": cmd_bench_burst,
    "build-engine": cmd_build_engine,
    "check-replica": cmd_check_replica,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"triage: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
