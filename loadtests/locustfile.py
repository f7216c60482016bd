"""Locust load for the triage gateway: OpenAI chat completions through the LiteLLM proxy.

Run it against a running stack (``triage up`` writes ``stack.json``)::

    locust -f loadtests/locustfile.py --headless --stack-state /path/to/stack.json \\
        --scenario steady --load 0.85 --duration-s 60 --csv out/locust --report-dir out

Every user is a Poisson source of ``--user-rps`` requests/s with a key drawn by weight from
``--keys-file`` (priority tiers); the scenario shape sets the number of users so that the offered
load is the wanted fraction of the fleet's capacity. Each request: streamed or not
(``--stream-fraction``), prompt and output lengths from the distributions, 503/429 retried after
``Retry-After`` (up to ``--max-retries``). At the end (on the master in distributed mode) the
report: per-replica share, latency/TTFT percentiles, 503 share, goodput, lost requests, and PNG
plots, in ``--report-dir``. Exit code 1 when any request was lost (no answer with a body); a
request still running when the run ended (its drain included) is reported as cut by the run's
end, apart from the lost ones, and does not fail the run.

Locust is imported first: it monkey-patches the standard library with gevent, which must happen
before anything imports ssl. This file never imports LiteLLM.
"""

# ruff: noqa: I001  (locust must be imported first: gevent monkey-patching)
from __future__ import annotations

import locust  # noqa: F401
from locust import FastHttpUser, LoadTestShape, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner, WorkerRunner

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from itertools import count
from typing import Any

import gevent
from pydantic import ValidationError

from loadtests.load_settings import LoadSettings, Resolved, resolve
from loadtests.report import Record, plot_runs, render_text, summarize
from loadtests.workloads import GroupAssigner, Workload
from loadtests.traffic import (
    Attempt,
    KeyTier,
    LengthDist,
    StreamReading,
    completion,
    pick_key,
    refusal,
)

log = logging.getLogger("triage.locust")
RESOLVED_ARG = "triage_resolved"
RETRY_HEADERS = ("retry-after-ms", "retry-after")
STREAM_HEADERS = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
# uvicorn (the proxy's server) closes keep-alive connections idle for 5 s; a POST sent on one as
# it closes dies unanswered (and POSTs are never replayed), so idle connections are dropped first
KEEPALIVE_IDLE_S = 4.0
_user_index = count()


class Collector:
    """This process's records; on a worker, the rows not yet sent to the master."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = 0
        self.records: list[Record] = []
        self.unsent: list[list[Any]] = []
        self.unsent_started = 0
        self.late_arrivals = 0
        self.events: list[tuple[float, str]] = []
        self.t0 = time.time()

    def start(self) -> None:
        self.started += 1
        self.unsent_started += 1

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.unsent.append(record.row())

    def take_unsent(self) -> dict[str, Any]:
        data = {"rows": self.unsent, "started": self.unsent_started, "late": self.late_arrivals}
        self.unsent, self.unsent_started, self.late_arrivals = [], 0, 0
        return data

    def merge(self, data: dict[str, Any]) -> None:
        self.started += int(data.get("started", 0))
        self.late_arrivals += int(data.get("late", 0))
        self.records.extend(Record.from_row(row) for row in data.get("rows", []))


COLLECTOR = Collector()


class State:
    """Settings and resolution of the current run (set at init, refreshed at test start)."""

    settings: LoadSettings | None = None
    resolved: Resolved | None = None
    prompt: LengthDist = LengthDist.parse("uniform:16,64")
    output: LengthDist = LengthDist.parse("fixed:25")
    workload: Workload = Workload()
    assign: GroupAssigner = Workload().assigner(random.Random(0))
    """The tenant or conversation of each request of this process (``workloads.py``)."""
    last_report: str = ""


STATE = State()


# -- arguments and settings -----------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _arguments(parser: LocustArgumentParser) -> None:
    for name, field in LoadSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=str,
            default="" if default is None else str(default),
            env_var=f"TRIAGE_LOAD_{name.upper()}",
            help=f"{field.description or ''} (TRIAGE_LOAD_{name.upper()})",
            is_secret=name == "api_key",
        )
    parser.add_argument(
        f"--{RESOLVED_ARG.replace('_', '-')}",
        type=str,
        default="",
        help="(internal: what the master resolved, sent to the workers)",
        include_in_web_ui=False,
    )


def settings_from(options: Any) -> LoadSettings:
    values = {
        name: getattr(options, name)
        for name in LoadSettings.model_fields
        if getattr(options, name, "") not in ("", None)
    }
    return LoadSettings(**values)


def report_invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"invalid setting {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
        for err in exc.errors()
    )


def configure(environment: Environment) -> None:
    """(Re)read the settings; the master/local runner resolves, workers take the master's."""
    options = environment.parsed_options
    settings = settings_from(options)
    STATE.settings = settings
    STATE.prompt, STATE.output = settings.prompt_dist(), settings.output_dist()
    STATE.workload = settings.workload_shape()
    # one stream of tenants / conversations per process (a worker's users share it)
    STATE.assign = STATE.workload.assigner(random.Random(f"{settings.seed}-{os.getpid()}"))
    if isinstance(environment.runner, WorkerRunner):
        raw = getattr(options, RESOLVED_ARG, "")
        if raw:
            STATE.resolved = Resolved.model_validate_json(raw)
    else:
        STATE.resolved = resolve(settings, environment.host)
        setattr(options, RESOLVED_ARG, STATE.resolved.model_dump_json())
        if not environment.host:
            environment.host = STATE.resolved.base_urls[0]
    ChatUser.network_timeout = settings.request_timeout_s
    ChatUser.connection_timeout = min(10.0, settings.request_timeout_s)
    if not environment.stop_timeout and STATE.resolved is not None:
        # stopping users must let their request finish, or it would be cut
        environment.stop_timeout = max(STATE.resolved.drain_s, 1.0)


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    try:
        configure(environment)
    except ValidationError as exc:
        print(f"locustfile: {report_invalid(exc)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:
        print(f"locustfile: invalid setting {exc}", file=sys.stderr)
        sys.exit(2)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.environment.events.report_to_master.add_listener(_report_to_master)
    elif isinstance(runner, MasterRunner):
        runner.environment.events.worker_report.add_listener(_worker_report)
    if environment.web_ui is not None:
        _add_web_routes(environment)


def _report_to_master(client_id: str, data: dict[str, Any]) -> None:
    data["triage"] = COLLECTOR.take_unsent()


def _worker_report(client_id: str, data: dict[str, Any]) -> None:
    if "triage" in data:
        COLLECTOR.merge(data["triage"])


def _add_web_routes(environment: Environment) -> None:
    from flask import Response, send_file

    app = environment.web_ui.app  # type: ignore[union-attr]

    @app.route("/triage/report")
    def triage_report() -> Response:
        text = STATE.last_report or "no report yet: the report is written when a run stops"
        return Response(text, mimetype="text/plain")

    @app.route("/triage/<name>.png")
    def triage_plot(name: str) -> Any:
        if STATE.settings is None or name not in ("latency", "replicas"):
            return Response("not found", status=404)
        path = STATE.settings.report_dir / f"{name}.png"
        if not path.exists():
            return Response("not found", status=404)
        return send_file(path.resolve(), mimetype="image/png")


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    COLLECTOR.reset()
    try:
        configure(environment)  # the web UI may have changed the settings
    except (ValidationError, ValueError) as exc:
        log.error("settings not applied, keeping the previous ones: %s", exc)


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or STATE.settings is None:
        return
    if isinstance(environment.runner, MasterRunner):
        gevent.sleep(STATE.settings.report_grace_s)  # the workers' last rows
    try:
        lost = write_report(STATE.settings, STATE.resolved)
    except Exception:
        log.exception("could not write the report")
        environment.process_exit_code = 1
        return
    # sheds are the gateway working as designed; the run fails only when a request was lost
    environment.process_exit_code = 1 if lost else 0


def write_report(settings: LoadSettings, resolved: Resolved | None) -> int:
    """Summary (text + JSON) and plots in ``report_dir``; returns the lost count."""
    records = sorted(COLLECTOR.records, key=lambda r: r.t)
    ids = resolved.replica_ids if resolved else []
    scenario = settings.scenario_spec(resolved.drain_s if resolved else None)
    summary = summarize(records, COLLECTOR.started, ids, window_s=scenario.duration_s)
    summary.late_arrivals = COLLECTOR.late_arrivals
    capacity = resolved.capacity_rps if resolved else float("nan")
    title = (
        f"triage locust: scenario {settings.scenario}, {len(ids) or '?'} replicas "
        f"(speeds {','.join(f'{s:g}' for s in (resolved.speeds if resolved else []))}), "
        f"capacity {capacity:.2f} req/s"
    )
    text = render_text(summary, title)
    out = settings.report_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = COLLECTOR.t0
    marks = [(t - t0, label) for t, label in COLLECTOR.events]
    marks += [(t, label) for t, label in scenario.events() if label != "drain"]
    plots = plot_runs(
        {settings.scenario: records}, out, ids, t0={settings.scenario: t0}, events=marks
    )
    doc = {
        "settings": settings.model_dump(mode="json", exclude={"api_key"}),
        "capacity_rps": capacity,
        "replica_ids": ids,
        "events": marks,
        "summary": summary.as_json(),
        "plots": [p.name for p in plots],
    }
    from loadtests.measure import jsonable

    (out / "report.json").write_text(json.dumps(jsonable(doc), indent=2, allow_nan=False))
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(jsonable(r.row())) + "\n")
    (out / "report.txt").write_text(text + "\n")
    STATE.last_report = text
    print("\n" + text + f"\nreport, records and plots in {out}/", flush=True)
    return summary.lost


# -- the user -------------------------------------------------------------------------------------


class ChatUser(FastHttpUser):
    """A Poisson source of chat completions with one virtual key."""

    host = "http://127.0.0.1"  # replaced by --host / the stack's proxy
    network_timeout = 120.0
    connection_timeout = 10.0
    max_retries = 1  # geventhttpclient: 1 = no transport-level retry (POSTs are not replayed)

    def on_start(self) -> None:
        settings, resolved = STATE.settings, STATE.resolved
        assert settings is not None and resolved is not None, "settings not configured"
        index = next(_user_index)
        self.rng = random.Random(settings.seed * 1_000_003 + index + os.getpid() * 7919)
        self.key: KeyTier = pick_key(resolved.keys, self.rng)
        self.base_url = resolved.base_urls[index % len(resolved.base_urls)]
        self.rate = settings.user_rps
        self.last_io = time.monotonic()
        self.next_at = time.monotonic() + self.rng.expovariate(self.rate)
        gevent.sleep(max(0.0, self.next_at - time.monotonic()))

    def wait_time(self) -> float:
        self.next_at += self.rng.expovariate(self.rate)
        now = time.monotonic()
        if self.next_at < now:
            COLLECTOR.late_arrivals += 1
            self.next_at = now  # no catch-up burst: the arrival is late, not doubled
        return self.next_at - now

    @task
    def chat(self) -> None:
        settings = STATE.settings
        assert settings is not None and STATE.resolved is not None
        stream = self.rng.random() < settings.stream_fraction
        max_tokens = STATE.output.sample(self.rng)
        group, turn = STATE.assign()
        own = STATE.prompt.sample(self.rng)
        messages = STATE.workload.messages(
            group, turn, own, settings.seed, self.rng.getrandbits(48)
        )
        body = {
            "model": STATE.resolved.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {self.key.key}"}
        COLLECTOR.start()
        t0, p0 = time.time(), time.perf_counter()
        retries = 0
        try:
            while True:
                got = self._attempt(body, headers, stream, p0)
                if got.outcome == "shed" and retries < settings.max_retries:
                    retries += 1
                    wait = got.retry_after_s
                    delay = wait if wait is not None else float(2 ** (retries - 1))
                    gevent.sleep(min(delay, settings.max_retry_wait_s))
                    continue
                break
        except gevent.GreenletExit:
            # Locust stopped this user (the run ended, drain included) while the request was
            # still running or waiting to retry: the run cut it, the stack did not lose it
            latency_s = time.perf_counter() - p0
            tier = self.key.label()
            detail = "cut by the run's end"
            COLLECTOR.add(
                Record(
                    t0, latency_s, "cut", stream=stream, retries=retries, tier=tier, detail=detail
                )
            )
            raise
        latency_s = time.perf_counter() - p0
        COLLECTOR.add(Record.of(got, t0, latency_s, stream, retries, self.key.label()))

    def _attempt(
        self, body: dict[str, Any], headers: dict[str, str], stream: bool, p0: float
    ) -> Attempt:
        """One HTTP attempt, marked a success or a failure in Locust's own statistics."""
        if time.monotonic() - self.last_io > KEEPALIVE_IDLE_S:
            self.client.client.clientpool.close()  # reconnect rather than race the server
        try:
            with self.client.post(
                f"{self.base_url}/v1/chat/completions",
                json=body,
                headers={**headers, **STREAM_HEADERS} if stream else headers,
                name="chat stream" if stream else "chat",
                catch_response=True,
                stream=stream,
            ) as resp:
                got = self._read(resp, stream, p0)
                if got.outcome == "ok":
                    resp.success()
                else:
                    resp.failure(got.detail)
                return got
        finally:
            self.last_io = time.monotonic()

    def _read(self, resp: Any, stream: bool, p0: float) -> Attempt:
        status = int(resp.status_code or 0)
        if status == 0:
            return Attempt("lost", 0, detail=type(getattr(resp, "error", None)).__name__)
        replica = (resp.headers or {}).get("x-litellm-model-id")
        if status != 200:
            hints = {h: (resp.headers or {}).get(h) for h in RETRY_HEADERS}
            found = {k: v for k, v in hints.items() if v is not None}
            return refusal(status, replica, resp.content, found)
        if not stream:
            return completion(status, replica, resp.content)
        raw = resp._response  # geventhttpclient's response: reads up to each newline
        reading = StreamReading(status, replica, p0)
        try:
            while line := raw.readline(b"\n"):
                first = reading.ttft_s is None
                got = reading.line(line, time.perf_counter())
                if first and reading.ttft_s is not None:
                    events.request.fire(
                        request_type="TTFT",
                        name="chat stream",
                        response_time=reading.ttft_s * 1000,
                        response_length=0,
                        exception=None,
                        context={},
                    )
                if got is not None:
                    return got
        except Exception as exc:  # connection reset, timeout mid-stream
            return reading.cut_short(type(exc).__name__)
        return reading.cut_short()


# -- the scenario shape ---------------------------------------------------------------------------


class ScenarioShape(LoadTestShape):
    """Users = offered load x capacity / user rate, per ``--scenario``; kills a replica in the
    ``kill`` scenario; ends after the drain, or during it once every request is answered (with
    workers: as far as their last reports tell)."""

    def reset_time(self) -> None:
        super().reset_time()
        self.killed = False

    def tick(self) -> tuple[int, float] | None:
        settings, resolved = STATE.settings, STATE.resolved
        if settings is None or resolved is None:
            return None
        scenario = settings.scenario_spec(resolved.drain_s)
        t = self.get_run_time()
        # workers' counts reach the master with their reports: wait two report intervals
        settle = 2 * WORKER_REPORT_INTERVAL if isinstance(self.runner, MasterRunner) else 0.0
        if t >= scenario.duration_s + settle and COLLECTOR.started == len(COLLECTOR.records):
            return None  # draining, and every request is answered: the run is over
        if scenario.kind == "kill" and t >= scenario.kill_at_s and not getattr(self, "killed", 0):
            self.killed = True
            kill_replica(settings, resolved)
        users = scenario.users_at(t, resolved.capacity_rps, settings.user_rps)
        if users is None:
            return None
        return users, float(max(users, 10))


def kill_replica(settings: LoadSettings, resolved: Resolved) -> None:
    """SIGKILL the replica's process group (its PID from stack.json), or run --kill-command."""
    replica = settings.kill_replica or (resolved.replica_ids[0] if resolved.replica_ids else "")
    when = time.time()
    if settings.kill_command:
        env = {**os.environ, "TRIAGE_KILL_REPLICA": replica}
        done = subprocess.run(settings.kill_command, shell=True, env=env, check=False)
        log.warning(
            "kill: ran %r for %s (exit %d)", settings.kill_command, replica, done.returncode
        )
    else:
        pid = resolved.replica_pids.get(replica)
        if pid is None:
            log.error("kill: no PID for replica %r in stack.json; nothing killed", replica)
            return
        try:
            os.killpg(pid, signal.SIGKILL)  # the replica leads its own process group
        except ProcessLookupError:
            log.error("kill: replica %s (pid %d) was not running", replica, pid)
            return
        log.warning("kill: SIGKILL to replica %s (process group %d)", replica, pid)
    COLLECTOR.events.append((when, f"{replica} killed"))
