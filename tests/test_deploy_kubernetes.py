"""The Kubernetes deployment (``deploy/kubernetes/``) and the image build files
(``deploy/images/``), checked offline: nothing is applied to a cluster, no image is built.

Every kustomization is rendered with ``kubectl kustomize`` (Debian's ``kubernetes-client``:
kubectl 1.20, whose kustomize is v2.0.3, so the manifests use only what it supports; a newer
kubectl renders them too) and every rendered document is validated, strictly (no unknown
field), against the schemas of Kubernetes ``KUBERNETES_VERSION`` (PyPI's
``kubernetes-validate``). Then the checks that catch drift between the manifests and the code:
every ``TRIAGE_*`` variable is a field of the settings class it targets and its value passes
that class's validation; the proxies' config is what ``plugins/proxy_config.py`` builds for the
rendered replicas and their environment is ``proxy_env``'s; the GPU pod runs what
``sidecar/tp_launcher.py`` would run, on as many GPUs as it has ranks; names, selectors, ports
and probes resolve; the Redis URLs name the rendered Sentinels; the Dockerfiles copy files that
exist and start modules that exist.

``KUBECTL=/path/to/kubectl`` picks another kubectl (e.g. 1.20's, to check the old kustomize on
a machine whose kubectl is newer). Missing kubectl or kubernetes-validate fails the test: run
``scripts/bootstrap.sh``.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from core.paths import REPO_ROOT
from plugins.proxy_config import ProxyOptions, ReplicaEndpoint, build_proxy_config, proxy_env

KUBERNETES_VERSION = "1.30.0"
"""The Kubernetes release whose API schemas every rendered document must pass (strict)."""

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
IMAGES = REPO_ROOT / "deploy" / "images"
BOOTSTRAP = (
    "run scripts/bootstrap.sh: the deployment checks need kubectl (Debian's kubernetes-client) "
    "and PyPI's kubernetes-validate"
)
FLEETS = ("standin", "gpu-trtllm", "postgres")
"""The overlays that deploy a whole fleet."""
TARGETS = (*FLEETS, "loadtest", "build-engine")
"""What is rendered: the overlays, the load test and the engine build (each of the last two
checked together with the overlay whose namespace it runs in)."""
RUNS_BESIDE = {"loadtest": "standin", "build-engine": "gpu-trtllm"}
GPU_TARGETS = ("gpu-trtllm", "build-engine")
"""The only targets that may ask for GPUs."""
SECRET_EXAMPLES = {
    "triage-secrets": DEPLOY / "secrets.example.yaml",
    "triage-postgres": DEPLOY / "overlays" / "postgres" / "secrets.example.yaml",
}
"""The Secrets the operator creates (no kustomization includes them, so that an apply never
overwrites the real ones); the checks resolve references against these placeholders."""
SOURCES = {
    "standin": DEPLOY / "overlays" / "standin",
    "gpu-trtllm": DEPLOY / "overlays" / "gpu-trtllm",
    "postgres": DEPLOY / "overlays" / "postgres",
    "loadtest": DEPLOY / "loadtest",
    "build-engine": DEPLOY / "build-engine",
}
IMAGE_FILES = {
    "triage-proxy": "proxy.Dockerfile",
    "triage-sidecar": "sidecar.Dockerfile",
    "triage-triton-standin": "triton-standin.Dockerfile",
    "triage-triton-trtllm": "triton-trtllm.Dockerfile",
}
PUBLIC_IMAGES = {"redis:7.2-bookworm", "postgres:16-bookworm"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
GPU = "nvidia.com/gpu"
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SAMPLE_POD = "0"
"""The ordinal of the StatefulSet pod whose environment is checked."""


# --- rendering ---------------------------------------------------------------------------


def kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found or not os.access(found, os.X_OK):
        pytest.fail(f"kubectl not found ({found or 'not on PATH'}); {BOOTSTRAP}")
    return found


def render(source: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(source)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {source.relative_to(REPO_ROOT)}:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class Rendered:
    """One target's documents, and everything that runs in its namespace (``cluster``)."""

    name: str
    docs: list[dict[str, Any]]
    cluster: list[dict[str, Any]]

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.cluster if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.objects(kind) if d["metadata"]["name"] == name]
        assert found, f"{self.name}: no {kind} {name!r}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(d["metadata"]["name"] == name for d in self.objects(kind))

    def pods(self, own: bool = True) -> list[Pod]:
        docs = self.docs if own else self.cluster
        return [Pod(d) for d in docs if d["kind"] in WORKLOADS]

    def pod(self, kind: str, name: str) -> Pod:
        return Pod(self.get(kind, name))


@cache
def rendered_targets() -> dict[str, Rendered]:
    docs = {name: render(path) for name, path in SOURCES.items()}
    secrets = [yaml.safe_load(path.read_text()) for path in SECRET_EXAMPLES.values()]
    out = {name: Rendered(name, docs[name], docs[name] + secrets) for name in FLEETS}
    for name, beside in RUNS_BESIDE.items():
        out[name] = Rendered(name, docs[name], docs[name] + docs[beside] + secrets)
    return out


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest) -> Rendered:
    return rendered_targets()[request.param]


@pytest.fixture(scope="module", params=FLEETS)
def fleet(request: pytest.FixtureRequest) -> Rendered:
    return rendered_targets()[request.param]


# --- pods, containers, environments -------------------------------------------------------


@dataclass
class Pod:
    workload: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.workload["kind"]

    @property
    def name(self) -> str:
        return self.workload["metadata"]["name"]

    @property
    def template(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"].get("labels", {})

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        return self.spec["containers"] + (self.spec.get("initContainers", []) if init else [])

    def container(self, name: str) -> dict[str, Any]:
        found = [c for c in self.containers() if c["name"] == name]
        assert found, f"{self.kind} {self.name}: no container {name!r}"
        return found[0]

    @property
    def pod_name(self) -> str:
        """A name the pod gets (StatefulSet: the first ordinal)."""
        suffix = SAMPLE_POD if self.kind == "StatefulSet" else "x7k2p"
        return f"{self.name}-{suffix}"

    def volume(self, name: str) -> dict[str, Any]:
        found = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        claims = self.workload["spec"].get("volumeClaimTemplates", [])
        found += [
            {"name": name, "claimTemplate": c} for c in claims if c["metadata"]["name"] == name
        ]
        assert found, f"{self.kind} {self.name}: no volume {name!r}"
        return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_value(rendered: Rendered, name: str, key: str) -> str:
    secret = rendered.get("Secret", name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    assert key in secret.get("data", {}), f"Secret {name} has no key {key!r}"
    return base64.b64decode(secret["data"][key]).decode()


def expand(text: str, env: dict[str, str], where: str) -> str:
    """Kubernetes' ``$(VAR)`` expansion; a variable not defined before is an error here (the
    kubelet would leave ``$(VAR)`` in the value as it is)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{where}: $({name}) names no variable defined before it"
        return env[name]

    return REFERENCE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def container_env(rendered: Rendered, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it, for the pod ``pod.pod_name``."""
    env: dict[str, str] = {}
    where = f"{rendered.name}: {pod.name}/{container['name']}"
    fields = {"metadata.name": pod.pod_name, "metadata.namespace": "triage"}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env, f"{where} {name}")
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secret_value(rendered, ref["name"], ref["key"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = str(rendered.get("ConfigMap", ref["name"])["data"][ref["key"]])
        else:
            raise AssertionError(f"{where} {name}: unexpected valueFrom {source}")
    return env


def every_container(rendered: Rendered) -> Iterator[tuple[Pod, dict[str, Any]]]:
    for pod in rendered.pods():
        for container in pod.containers():
            yield pod, container


def env_of(rendered: Rendered, kind: str, workload: str, container: str) -> dict[str, str]:
    pod = rendered.pod(kind, workload)
    return container_env(rendered, pod, pod.container(container))


# --- the settings classes the TRIAGE_* variables target -----------------------------------


def load_script(path: Path) -> ModuleType:
    """A script of ``deploy/`` as a module (registered, so its annotations resolve)."""
    name = "deploy_" + "_".join(path.relative_to(REPO_ROOT / "deploy").with_suffix("").parts)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@cache
def settings_classes() -> dict[str, type[BaseSettings]]:
    """Every settings class a manifest may configure, by its env prefix."""
    from build_engines.settings import BuildSettings
    from core.redis_client import RedisPoolSettings
    from loadtests.load_settings import LoadSettings
    from plugins.admission.settings import AdmissionSettings
    from plugins.auth.settings import KeysSettings
    from plugins.catalogue.settings import CatalogueSettings
    from plugins.front_door.settings import FrontDoorSettings
    from plugins.routing.settings import RoutingSettings
    from plugins.triton_provider.settings import TritonProviderSettings
    from sidecar.settings import SidecarSettings
    from sidecar.tp_launcher import TpReplicaSettings

    standin = load_script(IMAGES / "triton_standin.py").StandinReplicaSettings
    classes: list[type[BaseSettings]] = [
        SidecarSettings,
        TpReplicaSettings,
        RoutingSettings,
        AdmissionSettings,
        KeysSettings,
        CatalogueSettings,
        TritonProviderSettings,
        FrontDoorSettings,
        RedisPoolSettings,
        LoadSettings,
        BuildSettings,
        standin,
    ]
    return {str(cls.model_config["env_prefix"]): cls for cls in classes}


def settings_class(variable: str) -> tuple[str, type[BaseSettings]]:
    prefixes = [p for p in settings_classes() if variable.startswith(p)]
    assert prefixes, (
        f"{variable}: no settings class has its prefix (known: {sorted(settings_classes())})"
    )
    prefix = max(prefixes, key=len)
    return prefix, settings_classes()[prefix]


def build_settings(
    cls: type[BaseSettings], variables: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> BaseSettings:
    """``cls`` from exactly ``variables`` (nothing else of the environment)."""
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.upper().startswith("TRIAGE_")]:
            patch.delenv(name)
        for name, value in variables.items():
            patch.setenv(name, value)
        return cls()


# --- Dockerfiles ---------------------------------------------------------------------------


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]
    workdir: str = "/"
    copies: list[tuple[str, str]] = field(default_factory=list)
    """(repository path, path in the image)"""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n", " ", path.read_text())
        lines = [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
        instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
        out = cls(path, instructions)
        for op, rest in instructions:
            if op == "WORKDIR":
                out.workdir = rest.strip()
            elif op == "COPY":
                *sources, dest = [w for w in shlex.split(rest) if not w.startswith("--")]
                inside = os.path.normpath(os.path.join(out.workdir, dest))
                into_folder = len(sources) > 1 or dest.endswith("/")
                for src in sources:
                    # a folder's contents land in dest; a file in dest/ keeps its name
                    is_file = (REPO_ROOT / src).is_file()
                    target = f"{inside}/{Path(src).name}" if into_folder and is_file else inside
                    out.copies.append((src, target))
            elif op == "ENTRYPOINT":
                out.entrypoint = json.loads(rest)
            elif op == "CMD":
                out.cmd = json.loads(rest)
        return out

    def repo_path(self, inside: str) -> Path | None:
        """The repository file at ``inside`` in the image (relative: to WORKDIR), if copied."""
        if not inside.startswith("/"):
            inside = f"{self.workdir.rstrip('/')}/{inside}"
        inside = os.path.normpath(inside)
        for src, dest in self.copies:
            if inside == dest or inside.startswith(dest + "/"):
                candidate = REPO_ROOT / src / os.path.relpath(inside, dest)
                return candidate.resolve() if candidate.exists() else None
        return None

    def module_path(self, module: str) -> Path | None:
        """The repository file of ``python -m module`` run in WORKDIR, if copied."""
        stem = module.replace(".", "/")
        return self.repo_path(f"{stem}.py") or self.repo_path(f"{stem}/__main__.py")


@cache
def dockerfiles() -> dict[str, Dockerfile]:
    return {image: Dockerfile.parse(IMAGES / name) for image, name in IMAGE_FILES.items()}


def image_name(reference: str) -> str:
    return reference.rsplit("/", 1)[-1].split(":", 1)[0]


def argv_of(container: dict[str, Any]) -> list[str]:
    """What the container runs, as Kubernetes decides: its command (else the image's
    entrypoint), then its args (else, without a command of its own, the image's CMD)."""
    image = dockerfiles().get(image_name(container["image"]))
    command = container.get("command") or (image.entrypoint if image else [])
    if "args" in container:
        args = container["args"]
    elif "command" in container:
        args = []
    else:
        args = image.cmd if image else []
    return [*command, *args]


# ==========================================================================================
# the tests
# ==========================================================================================


def test_every_document_passes_the_kubernetes_schema(target: Rendered) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes_validate is not installed; {BOOTSTRAP}")
    kinds = {d["kind"] for d in target.docs}
    assert kinds, f"{target.name}: nothing rendered"
    failures = []
    examples = [yaml.safe_load(path.read_text()) for path in SECRET_EXAMPLES.values()]
    for doc in target.docs + examples:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (
            kubernetes_validate.ValidationError,
            kubernetes_validate.SchemaNotFoundError,
        ) as exc:
            failures.append(f"{doc['kind']} {doc['metadata']['name']}: {exc}")
    assert not failures, "\n".join(failures)
    for doc in target.docs:
        expected = {"HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1"}
        if doc["kind"] in expected:
            assert doc["apiVersion"] == expected[doc["kind"]], doc["metadata"]["name"]


def test_each_fleet_has_the_whole_topology(fleet: Rendered) -> None:
    for kind, name in [
        ("StatefulSet", "triage-replica"),
        ("Service", "triage-replica"),
        ("StatefulSet", "triage-redis"),
        ("StatefulSet", "triage-redis-sentinel"),
        ("Deployment", "triage-proxy"),
        ("Service", "triage-proxy"),
        ("HorizontalPodAutoscaler", "triage-proxy"),
        ("PodDisruptionBudget", "triage-proxy"),
    ]:
        assert fleet.has(kind, name), f"{fleet.name}: no {kind} {name}"
    assert fleet.get("StatefulSet", "triage-redis")["spec"]["replicas"] >= 2  # primary + replicas
    assert fleet.get("StatefulSet", "triage-redis-sentinel")["spec"]["replicas"] == 3
    assert {c["name"] for c in fleet.pod("StatefulSet", "triage-replica").containers()} == {
        "triton",
        "sidecar",
    }
    # PostgreSQL only where asked for; the load test is never part of a fleet
    assert fleet.has("StatefulSet", "triage-postgres") == (fleet.name == "postgres")
    assert not any(d["kind"] == "Job" for d in fleet.docs)


def test_selectors_and_names_resolve(target: Rendered) -> None:
    pods = target.pods(own=False)
    for pod in target.pods():
        where = f"{target.name}: {pod.kind} {pod.name}"
        selector = pod.workload["spec"].get("selector", {}).get("matchLabels")
        if pod.kind != "Job":
            assert selects(selector, pod.labels), f"{where}: selector {selector} misses its pods"
        if pod.kind == "StatefulSet":
            service = target.get("Service", pod.workload["spec"]["serviceName"])
            assert service["spec"].get("clusterIP") == "None", f"{where}: service not headless"
            assert selects(service["spec"]["selector"], pod.labels), f"{where}: service"
        volumes = {v["name"] for v in pod.spec.get("volumes", [])} | {
            c["metadata"]["name"] for c in pod.workload["spec"].get("volumeClaimTemplates", [])
        }
        for volume in pod.spec.get("volumes", []):
            if "configMap" in volume:
                target.get("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                target.get("Secret", volume["secret"]["secretName"])
            if "persistentVolumeClaim" in volume:
                target.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in pod.containers():
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}/{container['name']}: {mount['name']}"
            container_env(target, pod, container)  # every secret, key and $(VAR) resolves
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in [d for d in target.docs if d["kind"] == kind]:
            spec = obj["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            assert any(selects(selector, p.labels) for p in pods), (
                f"{target.name}: {kind} {obj['metadata']['name']} selects no pod"
            )
    for hpa in [d for d in target.docs if d["kind"] == "HorizontalPodAutoscaler"]:
        ref = hpa["spec"]["scaleTargetRef"]
        scaled = target.pod(ref["kind"], ref["name"])
        assert "replicas" not in scaled.workload["spec"], "apply would reset the HPA's choice"
        for metric in hpa["spec"]["metrics"]:
            name = metric["resource"]["name"]
            for container in scaled.containers(init=False):
                assert name in container.get("resources", {}).get("requests", {}), (
                    f"the HPA scales on {name}: {container['name']} must request it"
                )


def test_service_ports_and_probes_hit_container_ports(target: Rendered) -> None:
    for service in [d for d in target.docs if d["kind"] == "Service"]:
        name = service["metadata"]["name"]
        selected = [
            p for p in target.pods(own=False) if selects(service["spec"]["selector"], p.labels)
        ]
        for port in service["spec"]["ports"]:
            wanted = port.get("targetPort", port["port"])
            for pod in selected:
                ports = [p for c in pod.containers(init=False) for p in c.get("ports", [])]
                hit = [p for p in ports if wanted in (p.get("name"), p["containerPort"])]
                assert hit, f"{target.name}: Service {name} port {wanted} is no port of {pod.name}"
                assert hit[0]["containerPort"] == port["port"], f"Service {name}: {wanted}"
    for pod, container in every_container(target):
        ports = container.get("ports", [])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if not probe:
                continue
            action = probe.get("httpGet") or probe.get("tcpSocket")
            if action is None:
                assert "exec" in probe, f"{pod.name}/{container['name']} {kind}"
                continue
            assert any(action["port"] in (p.get("name"), p["containerPort"]) for p in ports), (
                f"{target.name}: {pod.name}/{container['name']} {kind} on port {action['port']}, "
                f"which the container does not declare"
            )


def health_routes_of_litellm() -> set[str]:
    spec = importlib.util.find_spec("litellm")  # not imported: its routes are read as text
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    source = (root / "proxy" / "health_endpoints" / "_health_endpoints.py").read_text()
    return set(re.findall(r'@router\.get\(\s*"(/health/[^"]+)"', source))


def test_probes_use_real_health_routes(target: Rendered) -> None:
    litellm_routes = health_routes_of_litellm()
    assert "/health/readiness" in litellm_routes  # the parse itself works
    sidecar_routes = set(
        re.findall(r'@app\.get\("([^"]+)"\)', (REPO_ROOT / "sidecar" / "service.py").read_text())
    )
    triton_routes = {"/v2/health/ready", "/v2/health/live"}  # KServe v2, Triton's HTTP API
    routes = {
        "triage-proxy": litellm_routes,
        "triage-sidecar": sidecar_routes,
        "triage-triton-standin": triton_routes,
        "triage-triton-trtllm": triton_routes,
    }
    for pod, container in every_container(target):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = (container.get(kind) or {}).get("httpGet")
            if get:
                known = routes[image_name(container["image"])]
                assert get["path"] in known, (
                    f"{pod.name}/{container['name']} {kind}: {get['path']} is not among {known}"
                )


def test_triage_variables_are_settings_fields(target: Rendered) -> None:
    for pod, container in every_container(target):
        for item in container.get("env", []):
            name = item["name"]
            if not name.startswith("TRIAGE_"):
                continue
            prefix, cls = settings_class(name)
            fields = {prefix + f.upper() for f in cls.model_fields}
            assert name in fields, (
                f"{target.name}: {pod.name}/{container['name']} sets {name}, which is no field "
                f"of {cls.__module__}.{cls.__name__} (env prefix {prefix})"
            )


def test_triage_values_pass_their_settings_validation(
    target: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each class built from the container's variables: every value given must be valid (a
    required field nobody sets is fine: e.g. the catalogue's file where it is not used)."""
    for pod, container in every_container(target):
        env = container_env(target, pod, container)
        by_prefix: dict[str, dict[str, str]] = {}
        for name, value in env.items():
            if name.startswith("TRIAGE_"):
                by_prefix.setdefault(settings_class(name)[0], {})[name] = value
        for prefix, variables in by_prefix.items():
            cls = settings_classes()[prefix]
            try:
                build_settings(cls, variables, monkeypatch)
            except ValidationError as exc:
                given = {n[len(prefix) :].lower() for n in variables}
                errors = [
                    e
                    for e in exc.errors()
                    if not (e["type"] == "missing" and e["loc"] and e["loc"][0] not in given)
                ]
                assert not errors, (
                    f"{target.name}: {pod.name}/{container['name']}: {cls.__name__} refuses "
                    f"{[(e['loc'], e['msg']) for e in errors]}"
                )


def test_no_pod_gets_service_link_variables(target: Rendered) -> None:
    """Kubernetes would give every pod <SERVICE>_SERVICE_HOST / _PORT variables for each
    Service: the triage-* Services would put TRIAGE_* names into the settings' namespace."""
    for pod in target.pods():
        assert pod.spec.get("enableServiceLinks") is False, f"{target.name}: {pod.name}"


def test_redis_urls_name_the_sentinels(target: Rendered) -> None:
    """Every Redis URL (parsed by ``core/redis_url.py``, as the components parse it) asks the
    rendered Sentinels for the rendered primary's name, with the Secret's password for the
    data nodes and for the Sentinels (``requirepass`` in sentinel-start.sh)."""
    from core.redis_url import sentinel_target

    sentinels = target.pod("StatefulSet", "triage-redis-sentinel")
    statefulset = sentinels.workload
    service = statefulset["spec"]["serviceName"]
    port = sentinels.container("sentinel")["ports"][0]["containerPort"]
    hosts = tuple(
        (f"{statefulset['metadata']['name']}-{i}.{service}", port)
        for i in range(statefulset["spec"]["replicas"])
    )
    sentinel_env = container_env(target, sentinels, sentinels.container("sentinel"))
    password = secret_value(target, "triage-secrets", "redis-password")
    urls = 0
    for pod, container in every_container(target):
        for name, value in container_env(target, pod, container).items():
            if not re.match(r"^(redis|rediss|unix|redis\+sentinel)://", value):
                continue
            urls += 1
            where = f"{target.name}: {pod.name}/{container['name']} {name}"
            parsed = sentinel_target(value)
            assert parsed is not None, f"{where}: every client goes through Sentinel"
            assert parsed.sentinels == hosts, f"{where}: {parsed.sentinels}"
            assert parsed.service == sentinel_env["MASTER_NAME"], where
            assert parsed.password == password, f"{where}: not the Secret's password"
            assert parsed.sentinel_password == password, f"{where}: sentinel_password"
            assert parsed.db == 0 and parsed.username is None, where
    assert urls or target.name == "build-engine", f"{target.name}: no Redis URL at all"


def test_redis_and_sentinel_agree(fleet: Rendered) -> None:
    redis = fleet.pod("StatefulSet", "triage-redis")
    sentinels = fleet.pod("StatefulSet", "triage-redis-sentinel")
    redis_env = container_env(fleet, redis, redis.container("redis"))
    sentinel_env = container_env(fleet, sentinels, sentinels.container("sentinel"))
    count = sentinels.workload["spec"]["replicas"]
    assert int(redis_env["SENTINELS"]) == int(sentinel_env["SENTINELS"]) == count
    assert count // 2 < int(sentinel_env["QUORUM"]) <= count
    assert redis_env["MASTER_NAME"] == sentinel_env["MASTER_NAME"]
    assert redis_env["SENTINEL_STATEFULSET"] == sentinels.name
    assert (
        redis_env["SENTINEL_SERVICE"]
        == sentinel_env["SENTINEL_SERVICE"]
        == sentinels.workload["spec"]["serviceName"]
    )
    assert sentinel_env["REDIS_STATEFULSET"] == redis.name
    assert (
        redis_env["REDIS_SERVICE"]
        == sentinel_env["REDIS_SERVICE"]
        == redis.workload["spec"]["serviceName"]
    )
    assert redis_env["REDISCLI_AUTH"] == redis_env["LOAD_STORE_PASSWORD"]
    config = fleet.get("ConfigMap", redis.volume("config")["configMap"]["name"])["data"]
    assert config["redis.conf"] == (REPO_ROOT / "redis" / "redis.conf").read_text(), (
        "deploy/kubernetes/base/redis/redis.conf must be a copy of redis/redis.conf"
    )
    for script in ("redis-start.sh", "sentinel-start.sh"):
        done = subprocess.run(["sh", "-n"], input=config[script], text=True, capture_output=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def proxy_config_of(fleet: Rendered) -> tuple[dict[str, Any], str]:
    """The proxies' LiteLLM config (the file their --config names) and its path."""
    pod = fleet.pod("Deployment", "triage-proxy")
    argv = argv_of(pod.container("proxy"))
    path = argv[argv.index("--config") + 1]
    text = mounted_file(fleet, pod, pod.container("proxy"), path)
    assert text is not None, f"{fleet.name}: --config {path} is in no mounted ConfigMap"
    return yaml.safe_load(text), path


def mounted_file(rendered: Rendered, pod: Pod, container: dict[str, Any], path: str) -> str | None:
    """The ConfigMap key mounted at ``path`` in ``container``, if any."""
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/")
        if path.startswith(folder + "/"):
            volume = pod.volume(mount["name"])
            if "configMap" not in volume:
                return None
            data = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
            key = path[len(folder) + 1 :]
            assert key in data, f"{pod.name}/{container['name']}: {path}: no key {key!r}"
            return str(data[key])
    return None


def expected_proxy_config(
    fleet: Rendered, actual: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """What plugins/proxy_config.py builds for the rendered replicas, and the
    gen_proxy_config.py arguments that write it."""
    replicas = fleet.pod("StatefulSet", "triage-replica")
    statefulset = replicas.workload
    triton = replicas.container("triton")
    port = next(p["containerPort"] for p in triton["ports"] if p["name"] == "http")
    sidecar_env = container_env(fleet, replicas, replicas.container("sidecar"))
    proxy_env_ = env_of(fleet, "Deployment", "triage-proxy", "proxy")
    model_name = actual["model_list"][0]["model_name"]
    dialect = actual["model_list"][0]["model_info"].get("triage_triton", {}).get("dialect")
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    endpoints = [
        ReplicaEndpoint(f"{name}-{i}", f"http://{name}-{i}.{service}:{port}")
        for i in range(statefulset["spec"]["replicas"])
    ]
    triton_model = sidecar_env["TRIAGE_SIDECAR_MODEL"]
    config = build_proxy_config(model_name, triton_model, endpoints, ProxyOptions(), dialect)
    database = "DATABASE_URL" in proxy_env_
    if database:  # LiteLLM's own keys (plugins/auth/README.md): no custom_auth, its database
        del config["general_settings"]["custom_auth"]
        config["general_settings"]["database_url"] = "os.environ/DATABASE_URL"
    args = [
        f"--model-name {model_name}",
        f"--triton-model {triton_model}",
        f"--dialect {dialect}",
        f"--replicas {len(endpoints)}",
        f"--statefulset {name}",
        f"--service {service}",
        f"--port {port}",
        *(["--database"] if database else []),
    ]
    return config, args


def test_proxy_config_is_what_proxy_config_builds(fleet: Rendered) -> None:
    actual, _ = proxy_config_of(fleet)
    expected, args = expected_proxy_config(fleet, actual)
    source = SOURCES[fleet.name].relative_to(REPO_ROOT)
    assert actual == expected, (
        f"{fleet.name}: the proxies' config is not what plugins/proxy_config.py builds for the "
        f"rendered replicas; write it again:\n  .venv/bin/python deploy/kubernetes/"
        f"gen_proxy_config.py {' '.join(args)} > <the config file of {source}>"
    )
    # gen_proxy_config.py writes exactly that
    script = load_script(DEPLOY / "gen_proxy_config.py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script.main([w for a in args for w in a.split()]) == 0
    assert yaml.safe_load(out.getvalue()) == actual


def dotted_object_exists(dotted: str) -> bool:
    """``package.module.name``: the module is a file of this repository defining ``name``."""
    module, _, name = dotted.rpartition(".")
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        return False
    tree = ast.parse(path.read_text())
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            defined |= {a.asname or a.name for a in node.names}
    return name in defined


def test_proxy_config_names_code_that_exists(fleet: Rendered) -> None:
    config, _ = proxy_config_of(fleet)
    settings = config["litellm_settings"]
    dotted = [c for c in settings["callbacks"] if c != "prometheus"]
    dotted += [p["custom_handler"] for p in settings["custom_provider_map"]]
    if "custom_auth" in config["general_settings"]:
        dotted.append(config["general_settings"]["custom_auth"])
    assert dotted
    for name in dotted:
        assert dotted_object_exists(name), f"{fleet.name}: {name} is no object of this repository"
    providers = {p["provider"] for p in settings["custom_provider_map"]}
    for deployment in config["model_list"]:
        assert deployment["litellm_params"]["model"].split("/", 1)[0] in providers


def test_proxy_deployments_are_the_replica_pods(fleet: Rendered) -> None:
    config, _ = proxy_config_of(fleet)
    replicas = fleet.pod("StatefulSet", "triage-replica")
    names = [f"{replicas.name}-{i}" for i in range(replicas.workload["spec"]["replicas"])]
    assert [d["model_info"]["id"] for d in config["model_list"]] == names
    sidecar_env = container_env(fleet, replicas, replicas.container("sidecar"))
    # pod 0's sidecar publishes under the id of the first deployment, with its api_base
    assert sidecar_env["TRIAGE_SIDECAR_REPLICA_ID"] == config["model_list"][0]["model_info"]["id"]
    assert (
        sidecar_env["TRIAGE_SIDECAR_API_BASE"]
        == config["model_list"][0]["litellm_params"]["api_base"]
    )


def test_proxy_environment_is_proxy_env(fleet: Rendered) -> None:
    env = env_of(fleet, "Deployment", "triage-proxy", "proxy")
    redis_url = env["TRIAGE_ROUTING_REDIS_URL"]
    expected = proxy_env(
        redis_url,
        env["TRIAGE_ROUTING_KEY_PREFIX"],
        secret_value(fleet, "triage-secrets", "litellm-master-key"),
    )
    expected.pop("PYTHONPATH")  # the image installs the project (deploy/images/proxy.Dockerfile)
    missing = sorted(set(expected) - set(env))
    assert not missing, f"{fleet.name}: proxy_env sets {missing}, the proxies do not"
    differ = {k: (env[k], v) for k, v in expected.items() if env[k] != v}
    assert not differ, f"{fleet.name}: proxy_env's values differ: {differ}"
    assert not [n for n in env if n.startswith("REDIS_")], "LiteLLM reads REDIS_* for its caches"


def test_gpus_are_set_only_in_the_gpu_overlay(target: Rendered) -> None:
    for pod, container in every_container(target):
        resources = container.get("resources", {})
        gpus = {**resources.get("requests", {}), **resources.get("limits", {})}.get(GPU)
        on_gpu = (target.name, pod.name, container["name"]) in (
            ("gpu-trtllm", "triage-replica", "triton"),
            ("build-engine", "triage-build-engine", "build"),
        )
        assert target.name in GPU_TARGETS or not on_gpu
        if on_gpu:
            assert gpus is not None and int(gpus) >= 1, f"{target.name}: {pod.name} needs GPUs"
            assert GPU in resources.get("limits", {}), "extended resources are set as limits"
        else:
            assert gpus is None, f"{target.name}: {pod.name}/{container['name']} asks for {GPU}"


def test_gpu_pod_runs_what_tp_launcher_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.settings import SidecarSettings
    from sidecar.tp_launcher import TpReplicaSettings, launch_argv, sidecar_settings

    gpu = rendered_targets()["gpu-trtllm"]
    pod = gpu.pod("StatefulSet", "triage-replica")
    triton = pod.container("triton")
    image = dockerfiles()[image_name(triton["image"])]
    assert image.entrypoint[-1].endswith("deploy/images/tp_replica.py")
    assert "command" not in triton and "args" not in triton, "the image's entrypoint launches"
    env = container_env(gpu, pod, triton)
    tp = build_settings(TpReplicaSettings, env, monkeypatch)
    assert isinstance(tp, TpReplicaSettings)
    gpus = int(triton["resources"]["limits"][GPU])
    argv = launch_argv(tp)
    if tp.serving == "engine":  # leader mode: one tritonserver rank per GPU under mpirun
        assert tp.world_size == gpus, f"TRIAGE_TP_WORLD_SIZE={tp.world_size}, {gpus} GPUs"
        assert argv[0] == tp.mpirun and argv.count(":") == gpus - 1, "one rank per GPU"
    else:  # the LLM API starts its own TP workers in one tritonserver
        assert tp.world_size == 1 and tp.max_active is not None, "LLM-API path"
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert (ports["http"], ports["grpc"], ports["metrics"]) == (
        tp.http_port,
        tp.grpc_port,
        tp.metrics_port,
    )
    # the repository and the checkpoint come from the models volume, mounted where the build wrote
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    root = next((p for p in mounts if str(tp.repository).startswith(p + "/")), None)
    assert root is not None, f"{tp.repository} is on no volume"
    assert "persistentVolumeClaim" in pod.volume(mounts[root]["name"])
    # the sidecar container gets what tp_launcher would start it with
    sidecar_env = container_env(gpu, pod, pod.container("sidecar"))
    sidecar = build_settings(SidecarSettings, sidecar_env, monkeypatch)
    wanted = sidecar_settings(tp)
    for name in (
        "replica_id",
        "model",
        "engine_model",
        "arrivals_model",
        "triton_url",
        "metrics_url",
        "max_active",
    ):
        assert getattr(sidecar, name) == getattr(wanted, name), f"sidecar {name}"
    assert sidecar.device_count == gpus, "TRIAGE_SIDECAR_DEVICE_COUNT: the pod's GPUs"
    assert not [n for n in env if n.startswith("TRIAGE_STANDIN_")], "stand-in settings on a GPU pod"
    # the chat template the proxies read compiles and renders
    from plugins.triton_provider.chat_template import ChatTemplate, load_template_source

    proxy = gpu.pod("Deployment", "triage-proxy")
    proxy_env_ = container_env(gpu, proxy, proxy.container("proxy"))
    template = mounted_file(
        gpu, proxy, proxy.container("proxy"), proxy_env_["TRIAGE_TRITON_CHAT_TEMPLATE"]
    )
    assert template is not None and "{%" in load_template_source(template)
    prompt = ChatTemplate(template).render([{"role": "user", "content": "hi"}])
    assert "hi" in prompt


def test_standin_pod_matches_its_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.settings import SidecarSettings

    standin = rendered_targets()["standin"]
    pod = standin.pod("StatefulSet", "triage-replica")
    triton = pod.container("triton")
    assert (
        dockerfiles()[image_name(triton["image"])]
        .entrypoint[-1]
        .endswith("deploy/images/triton_standin.py")
    )
    cls = settings_classes()["TRIAGE_STANDIN_"]
    settings = build_settings(cls, container_env(standin, pod, triton), monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert (ports["http"], ports["grpc"], ports["metrics"]) == (
        settings.http_port,  # type: ignore[attr-defined]
        settings.grpc_port,  # type: ignore[attr-defined]
        settings.metrics_port,  # type: ignore[attr-defined]
    )
    sidecar = build_settings(
        SidecarSettings, container_env(standin, pod, pod.container("sidecar")), monkeypatch
    )
    assert isinstance(sidecar, SidecarSettings)
    assert sidecar.model == settings.model_name  # type: ignore[attr-defined]
    assert sidecar.triton_url == f"http://127.0.0.1:{ports['http']}"
    assert sidecar.metrics_url == f"http://127.0.0.1:{ports['metrics']}/metrics"
    if settings.dialect == "llmapi":  # type: ignore[attr-defined]
        # no engine gauges and no preprocessing step: as devstack/stack.py's _sidecar_extra
        assert sidecar.max_active == settings.max_active and sidecar.arrivals_model is None  # type: ignore[attr-defined]
    # the server's command line is the devstack launcher's, on every interface
    argv = load_script(IMAGES / "triton_standin.py").server_argv(settings)
    assert f"--http-port={ports['http']}" in argv and "--http-address=0.0.0.0" in argv


def test_secrets_are_created_by_hand_and_committed_as_placeholders(target: Rendered) -> None:
    rendered = [d["metadata"]["name"] for d in target.docs if d["kind"] == "Secret"]
    assert not rendered, f"{target.name}: an apply would overwrite the real Secrets {rendered}"
    for name, path in SECRET_EXAMPLES.items():
        secret = yaml.safe_load(path.read_text())
        assert secret["kind"] == "Secret" and secret["metadata"]["name"] == name, path
        values = dict(secret.get("stringData", {}))
        values |= {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        for key, value in values.items():
            assert "CHANGE-ME" in value, (
                f"Secret {secret['metadata']['name']} {key}: a committed secret must be a "
                "clearly marked placeholder (CHANGE-ME)"
            )


def test_dockerfiles_copy_what_exists_and_start_what_exists() -> None:
    for dockerfile in dockerfiles().values():
        where = dockerfile.path.name
        assert dockerfile.copies, where
        for src, _ in dockerfile.copies:
            assert (REPO_ROOT / src).exists(), f"{where}: COPY {src}: not in the repository"
        copied = {src for src, _ in dockerfile.copies}
        assert {"pyproject.toml", "README.md"} <= copied, f"{where}: pip install -e . needs them"
        argv = dockerfile.entrypoint
        assert argv and argv[0] in ("python", "python3"), f"{where}: ENTRYPOINT {argv}"
        if argv[1] == "-m":
            assert dockerfile.module_path(argv[2]), f"{where}: module {argv[2]} not in the image"
        else:
            assert dockerfile.repo_path(argv[1]), f"{where}: {argv[1]} not in the image"
        assert any(
            op == "RUN" and "pip install" in rest and "-e ." in rest
            for op, rest in dockerfile.instructions
        ), where
    trtllm = dockerfiles()["triage-triton-trtllm"]
    assert trtllm.instructions[0] == ("ARG", "TRITON_TRTLLM_IMAGE")
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3" in trtllm.path.read_text()


def test_containers_run_images_and_files_built_here(target: Rendered) -> None:
    for pod, container in every_container(target):
        where = f"{target.name}: {pod.name}/{container['name']}"
        reference = container["image"]
        if reference in PUBLIC_IMAGES:
            continue
        name = image_name(reference)
        assert name in dockerfiles(), (
            f"{where}: image {reference} is built by no deploy/images file"
        )
        image = dockerfiles()[name]
        argv = argv_of(container)
        if argv[:2] in (["python", "-m"], ["python3", "-m"]):
            assert image.module_path(argv[2]), f"{where}: module {argv[2]} not in {reference}"
        if argv[0] == "locust":
            locustfile = argv[argv.index("-f") + 1]
            assert image.repo_path(locustfile), f"{where}: {locustfile} not in {reference}"
        if argv[:2] == ["sh", "-c"]:
            for command in re.findall(r"^\s*triage (\w+)", argv[2], re.MULTILINE):
                from triage.cli import COMMANDS

                assert command in COMMANDS, f"{where}: triage {command}"
        if "--config" in argv:
            assert mounted_file(target, pod, container, argv[argv.index("--config") + 1])


def test_engine_build_makes_what_the_gpu_pods_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The build Job's settings (``triage build-engine``), turned into the replica's launch
    settings by ``build_engines.main.launch_settings``, are the GPU pods' ``TRIAGE_TP_*``;
    the Job has the GPUs its plan needs, and writes where the pods read."""
    from build_engines.main import launch_settings
    from build_engines.settings import load_settings
    from sidecar.tp_launcher import TpReplicaSettings

    build = rendered_targets()["build-engine"]
    job = build.pod("Job", "triage-build-engine")
    container = job.container("build")
    argv = argv_of(container)
    assert argv[:2] == ["triage", "build-engine"], argv
    from triage.cli import COMMANDS

    assert "build-engine" in COMMANDS
    image = dockerfiles()[image_name(container["image"])]
    args = list(argv[2:])
    settings_file = args[args.index("--settings") + 1]
    in_repo = image.repo_path(settings_file)
    assert in_repo is not None, f"{settings_file} is not in {container['image']}"
    args[args.index("--settings") + 1] = str(in_repo)
    env = {k: v for k, v in container_env(build, job, container).items() if k.startswith("TRIAGE_")}
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.upper().startswith("TRIAGE_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        settings = load_settings(args)
    assert int(container["resources"]["limits"][GPU]) == settings.world_size
    gpu = rendered_targets()["gpu-trtllm"]
    replicas = gpu.pod("StatefulSet", "triage-replica")
    triton = replicas.container("triton")
    served = build_settings(TpReplicaSettings, container_env(gpu, replicas, triton), monkeypatch)
    built = launch_settings(settings, replica_id=replicas.pod_name)
    for name in ("replica_id", "repository", "serving", "world_size", "model", "max_active"):
        assert getattr(served, name) == getattr(built, name), (
            f"TRIAGE_TP_{name.upper()}={getattr(served, name)!r}, but the build makes "
            f"{getattr(built, name)!r}"
        )
    # the same volume, the same paths: what the Job writes is what the pods mount
    for path in (settings.output_dir, settings.model_dir):
        for pod, c in ((job, container), (replicas, triton)):
            mount = next(m for m in c["volumeMounts"] if str(path).startswith(m["mountPath"] + "/"))
            claim = pod.volume(mount["name"])["persistentVolumeClaim"]["claimName"]
            assert claim == "triage-models", f"{pod.name}: {path} on {claim}"
    written = next(m for m in container["volumeMounts"] if m["mountPath"] == "/engines")
    assert not written.get("readOnly"), "the build writes the engines"
