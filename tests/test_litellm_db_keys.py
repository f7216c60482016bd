"""Mode 2 of ``plugins/auth``: LiteLLM's own database-backed virtual keys, on a real PostgreSQL,
with every triage plugin in the real proxy.

The plugins must read a database key's priority and model list as they read an offline key's
(``plugins/auth/identity.py``): ``/key/generate`` (master key) with ``models`` and
``metadata.priority`` -> a chat with the new key through the plugins; a model outside its list
refused; the admission gate queues it at its priority (the score of its place in Redis);
``/key/info``; ``/key/delete`` -> 401.

Prisma's native query engine cannot be downloaded here, so prisma-client-py (the client LiteLLM
uses) runs ``tests/prisma_engine`` in its place: Prisma's own query engine compiled to
WebAssembly, over node-postgres (test-only plumbing: ``tests/prisma_engine/README.md``). The
schema comes from ``litellm-proxy-extras``' SQL migrations, applied with ``psql`` (Prisma's
schema engine is native too). Install everything with ``scripts/install_prisma_standin.sh``;
a missing part fails the test, naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.paths import REPO_ROOT, free_port
from core.process import ManagedProcess
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.redis_launcher import PROXY_USER
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from devstack.triton_launcher import PROVIDER_DIALECT
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)

pytestmark = pytest.mark.integration

MODEL = "standin"
ENGINE_DIR = REPO_ROOT / "tests" / "prisma_engine"
QUERY_ENGINE = ENGINE_DIR / "query-engine"
SCHEMA_ENGINE = ENGINE_DIR / "schema-engine"
PRISMA_PY_PATH = ENGINE_DIR / "python"
"""prisma-client-py and its generated client (``pip install --target``), on the proxy's path."""
INSTALL = "scripts/install_prisma_standin.sh"
QUEUE_SCORE_PRIORITY = 2**40
"""``queue:{model}`` scores are ``priority * 2^40 + arrival`` (``core/keyschema.py``)."""


# -- what must be installed ----------------------------------------------------------------------


def missing(what: str) -> NoReturn:
    pytest.fail(f"{what}; install it with `{INSTALL}` (CI runs it)", pytrace=False)


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    if not dirs or not (Path(dirs[-1]) / "initdb").exists():
        missing("no PostgreSQL server (initdb, postgres): Debian package `postgresql`")
    return Path(dirs[-1])


def psql_path(bindir: Path) -> str:
    found = shutil.which("psql") or str(bindir / "psql")
    if not Path(found).exists():
        missing("no psql: Debian package `postgresql-client`")
    return found


def generated_client_dir() -> Path:
    """prisma-client-py's package, generated from LiteLLM's schema, in ``PRISMA_PY_PATH`` (not
    in the venv: an importable generated client slows every LiteLLM proxy start)."""
    package = PRISMA_PY_PATH / "prisma"
    generated = package / "schema.prisma"
    if not (package / "client.py").exists() or not generated.exists():
        missing(f"no generated prisma-client-py in {PRISMA_PY_PATH}")
    litellm_spec = importlib.util.find_spec("litellm")
    assert litellm_spec is not None and litellm_spec.origin is not None
    litellm_schema = Path(litellm_spec.origin).parent / "proxy" / "schema.prisma"
    if schema_outline(generated.read_text()) != schema_outline(litellm_schema.read_text()):
        missing("prisma-client-py's client was generated from another schema than LiteLLM's")
    return package


def schema_outline(schema: str) -> list[tuple[str, str, str]]:
    """(model, field, type) of every field: the generated copy of a schema is reformatted."""
    outline: list[tuple[str, str, str]] = []
    for block in re.finditer(r"^(model|enum)\s+(\w+)\s*\{(.*?)^\}", schema, re.M | re.S):
        for line in block.group(3).splitlines():
            words = line.split("//")[0].split()
            if words and not words[0].startswith("@"):
                outline.append((block.group(2), words[0], words[1] if len(words) > 1 else ""))
    return outline


def check_standin() -> None:
    if shutil.which("node") is None:
        missing("no node (Node.js >= 18) for the query-engine stand-in")
    if not (ENGINE_DIR / "node_modules" / "@prisma" / "query-engine-wasm").is_dir():
        missing(f"{ENGINE_DIR}: node_modules missing (npm ci)")


def migrations_dir() -> Path:
    spec = importlib.util.find_spec("litellm_proxy_extras")
    if spec is None or spec.origin is None:
        missing("litellm-proxy-extras (LiteLLM's migrations) is not installed")
    return Path(spec.origin).parent / "migrations"


# -- PostgreSQL ----------------------------------------------------------------------------------


@dataclass
class Postgres:
    root: Path
    port: int
    psql: str
    process: ManagedProcess

    def url(self, database: str = "litellm") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run_sql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [self.psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(database)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def ready(self) -> bool:
        return self.run_sql("SELECT 1").strip() == "1"

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, which ends its backends and reaps them),
        then whatever is left of the process group."""
        if self.process.alive() and self.process.proc is not None:
            os.kill(self.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.proc.wait(timeout=15)
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(logdir: Path) -> Postgres:
    """A throw-away server: trust auth on 127.0.0.1 only, no fsync. As root, it runs as the
    ``postgres`` user (the server refuses root) in a folder that user owns."""
    bindir = postgres_bindir()
    psql = psql_path(bindir)
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("no `postgres` user to run the server as (Debian package `postgresql`)")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        # setpriv execs (no fork): the postmaster is the managed process, signalled directly
        as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    data = root / "data"
    initdb = [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres"]
    init = subprocess.run(
        [*initdb, "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
    port = free_port()
    argv = [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
    argv += ["-h", "127.0.0.1", "-k", str(root), "-c", "fsync=off", "-c", "full_page_writes=off"]
    argv += ["-c", "synchronous_commit=off", "-c", "max_connections=100"]
    process = ManagedProcess("postgres", argv, logdir / "postgres.log")
    server = Postgres(root, port, psql, process)
    process.start()
    try:
        process.wait_until(server.ready, 60.0, "accepting connections")
        server.run_sql("CREATE DATABASE litellm")
        apply_migrations(server)
    except BaseException:
        server.stop()
        raise
    return server


def apply_migrations(server: Postgres) -> None:
    """litellm-proxy-extras' migrations in Prisma's order (folder names), each statement on its
    own as ``psql`` sends them (some are ``CREATE INDEX CONCURRENTLY``): what ``prisma migrate
    deploy`` would apply, without Prisma's native schema engine."""
    folders = sorted(p for p in migrations_dir().iterdir() if (p / "migration.sql").is_file())
    if len(folders) < 100:
        missing(f"only {len(folders)} migrations found in {migrations_dir()}")
    script = "".join(f"{(f / 'migration.sql').read_text()}\n;\n" for f in folders)
    server.run_sql(script, database="litellm")


# -- the stack and the proxy in database-key mode ------------------------------------------------


def db_key_proxy_config(stack: Stack) -> dict[str, Any]:
    """``plugins/proxy_config.py``'s config for mode 2: no ``custom_auth``, LiteLLM's database."""
    s = stack.settings
    endpoints = [ReplicaEndpoint(rid, server.http_url) for rid, server in stack.replicas.items()]
    config = build_proxy_config(
        s.model,
        s.model,
        endpoints,
        ProxyOptions(num_retries=0, prometheus=False),
        dialect=PROVIDER_DIALECT[s.dialect],
    )
    general = config["general_settings"]
    general.pop("custom_auth")
    general["database_url"] = "os.environ/DATABASE_URL"
    return config


def db_key_proxy_env(database_url: str) -> dict[str, str]:
    """LiteLLM's database, prisma-client-py's engine and CLI from ``tests/prisma_engine``."""
    return {
        "PYTHONPATH": os.pathsep.join((str(REPO_ROOT), str(PRISMA_PY_PATH))),
        "DATABASE_URL": database_url,
        # no `prisma migrate deploy` (the migrations are applied above): LiteLLM then only runs
        # `prisma migrate diff`, which fails without a schema engine and is only logged
        "DISABLE_SCHEMA_UPDATE": "true",
        "PRISMA_QUERY_ENGINE_BINARY": str(QUERY_ENGINE),
        "PRISMA_SCHEMA_ENGINE_BINARY": str(SCHEMA_ENGINE),
        "PRISMA_BINARY_CACHE_DIR": str(ENGINE_DIR),  # the Prisma CLI: never npm-installed here
        "PRISMA_HIDE_UPDATE_MESSAGE": "true",
        "CHECKPOINT_DISABLE": "1",  # the Prisma CLI's telemetry
        # one admission slot on the one replica, no shedding on the queue's measured rate: a
        # second request waits in the gate's queue, where its priority shows
        "TRIAGE_ADMISSION_QUEUE_ALLOWANCE": "0",
        "TRIAGE_ADMISSION_EXPECTED_WAIT_FRACTION": "0",
        "TRIAGE_ADMISSION_MAX_WAIT_MS": "20000",
    }


@dataclass
class DbKeyProxy:
    stack: Stack
    postgres: Postgres
    proxy: LiteLLMProxy

    @property
    def base_url(self) -> str:
        return self.proxy.base_url

    @property
    def master_key(self) -> str:
        return self.proxy.master_key


@pytest.fixture(scope="module")
def db_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbKeyProxy]:
    check_standin()
    generated_client_dir()
    workdir = tmp_path_factory.mktemp("db-keys")
    settings = StackSettings(
        catalogue=[],
        replicas=1,
        proxies=0,  # started below, in mode 2
        max_active=1,
        decode_ms_per_token=10.0,
        num_retries=0,
        workdir=workdir,
    )
    stack = Stack(settings)
    postgres: Postgres | None = None
    proxy: LiteLLMProxy | None = None
    try:
        with ThreadPoolExecutor(2) as pool:
            pg_started = pool.submit(start_postgres, workdir)
            stack_started = pool.submit(stack.start)
            try:
                postgres = pg_started.result()
            finally:
                stack_started.result()
        assert stack.redis is not None
        config = write_proxy_config(db_key_proxy_config(stack), workdir / "proxy.yaml")
        env = proxy_env(stack.redis_url(PROXY_USER), settings.key_prefix, new_master_key())
        proxy = start_proxy(
            "db-keys",
            config,
            env,
            workdir,
            ready_timeout_s=180.0,
            extra_env=db_key_proxy_env(postgres.url()),
        )
        yield DbKeyProxy(stack, postgres, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()
        if postgres is not None:
            postgres.stop()


# -- the test ------------------------------------------------------------------------------------


def chat(base_url: str, key: str, model: str = MODEL, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", **extra.pop("headers", {})},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        | extra,
        timeout=60,
    )


async def queued_priority(db: DbKeyProxy, key: str, master_key: str) -> int:
    """The priority the admission gate queued ``key``'s request at: the one slot is taken by a
    master-key stream, the key's request waits in ``queue:{model}``, its score says its tier."""
    redis = Redis.from_url(db.stack.redis_url())
    queue = KeySchema(db.stack.settings.key_prefix).queue(MODEL)
    call_id = f"db-key-{time.time_ns()}"
    async with httpx.AsyncClient(base_url=db.base_url, timeout=60) as client:

        async def hold() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hold"}]}
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=body | {"max_tokens": 150, "stream": True},
                headers={"Authorization": f"Bearer {master_key}"},
            ) as answer:
                assert answer.status_code == 200
                async for _ in answer.aiter_lines():
                    pass

        holder = asyncio.create_task(hold())
        try:
            while not await redis.zcard(KeySchema(db.stack.settings.key_prefix).admitted(MODEL)):
                assert not holder.done(), "the holder ended before it was admitted"
                await asyncio.sleep(0.01)
            waiter = asyncio.create_task(
                client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                    | {"max_tokens": 3},
                    headers={"Authorization": f"Bearer {key}", "x-litellm-call-id": call_id},
                )
            )
            score: float | None = None
            deadline = time.monotonic() + 20
            while score is None and time.monotonic() < deadline and not waiter.done():
                for member, value in await redis.zrange(queue, 0, -1, withscores=True):
                    if member.decode().startswith(call_id):
                        score = value
                await asyncio.sleep(0.005)
            await holder
            answer = await waiter
        finally:
            holder.cancel()
            await redis.aclose()
    assert answer.status_code == 200, answer.text
    assert score is not None, "the key's request never waited in the gate's queue"
    return int(score) // QUEUE_SCORE_PRIORITY


def test_database_keys_through_the_plugins(db_proxy: DbKeyProxy) -> None:
    base = db_proxy.base_url
    ready = httpx.get(f"{base}/health/readiness", timeout=10).json()
    assert ready["db"] == "connected", ready
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {db_proxy.master_key}"}, timeout=60
    ) as admin:
        made = admin.post(
            "/key/generate",
            json={
                "key_alias": f"db-key-{time.time_ns()}",
                "models": [MODEL],
                "max_parallel_requests": 4,
                "metadata": {"priority": 3, "team": "search"},
            },
        )
        assert made.status_code == 200, made.text
        body = made.json()
        key, token = body["key"], body["token_id"]
        assert key.startswith("sk-") and body["models"] == [MODEL]
        assert body["metadata"] == {"priority": 3, "team": "search"}
        elsewhere = admin.post("/key/generate", json={"models": ["elsewhere"]})
        assert elsewhere.status_code == 200, elsewhere.text

        # a chat with the new key, through every plugin
        answer = chat(base, key)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert answer.headers["x-litellm-model-id"] == "replica-0"  # the routing plugin's pick
        listed = httpx.get(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert [m["id"] for m in listed.json()["data"]] == [MODEL]

        # a model outside the key's list: LiteLLM's own check answers as custom_auth does in
        # mode 1 (tests/test_auth_routes.py): 403 key_model_access_denied, param model
        for who, model in ((key, "standin-other"), (elsewhere.json()["key"], MODEL)):
            refused = chat(base, who, model=model)
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert (error["type"], error["param"]) == ("key_model_access_denied", "model"), error
            assert model in error["message"]

        # the admission gate queued the key's request at the key's priority
        assert asyncio.run(queued_priority(db_proxy, key, db_proxy.master_key)) == 3

        info = admin.get("/key/info", params={"key": token})
        assert info.status_code == 200, info.text
        shown = info.json()["info"]
        assert shown["metadata"]["priority"] == 3 and shown["models"] == [MODEL]
        assert shown["key_alias"] == body["key_alias"]

        deleted = admin.post("/key/delete", json={"keys": [key]})
        assert deleted.status_code == 200, deleted.text
        gone = chat(base, key)
        assert gone.status_code == 401, gone.text
        # LiteLLM's type is token_not_found_in_db (mode 1: auth_error); the status is the same
        assert gone.json()["error"]["code"] == "401", gone.text
        # LiteLLM keeps a deleted key's record (LiteLLM_DeletedVerificationToken); mode 1: 404
        after = admin.get("/key/info", params={"key": token})
        assert after.status_code == 200 and after.json()["info"]["status"] == "deleted", after.text
