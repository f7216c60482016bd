"""``deploy/observability``: the alert rules pass ``promtool``'s checks and its unit tests, the
dashboard's queries parse, and every metric the dashboard and the rules query is one the code
exports, read from prometheus_client's registries (renaming a metric in the code fails here).

promtool comes from Debian's ``prometheus`` package (``scripts/bootstrap.sh``); without it these
tests fail rather than skip: a check that passes without checking is a bug here.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from core.paths import REPO_ROOT

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "prometheus" / "alerts.yml"
RULE_TESTS = OBSERVABILITY / "prometheus" / "alerts_test.yml"
EXAMPLE_CONFIGS = (
    OBSERVABILITY / "prometheus" / "prometheus.example.yml",
    OBSERVABILITY / "prometheus" / "prometheus.kubernetes.yml",
)
DASHBOARD = OBSERVABILITY / "grafana" / "triage.json"

METRIC_PACKAGES = ("core", "sidecar", "plugins")
"""Where the metrics the dashboard and the alerts read are defined."""
METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
PROMETHEUS_MADE = {"up"}
"""Series Prometheus itself makes for every target (no code exports them)."""
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}
"""The series names prometheus_client exposes for a family of each type (the family's own name
for the others: gauge, enum, stateset, unknown)."""
TIMEOUT_S = 30


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool in the rules' folder (rule files are named relative to it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run scripts/bootstrap.sh (it installs Debian's "
            "`prometheus` package, which ships promtool)",
            pytrace=False,
        )
    return subprocess.run(
        [path, *map(str, args)],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


# -- the metrics the code exports --------------------------------------------------------------


def metric_modules() -> Iterator[tuple[str, ast.Module, set[str]]]:
    """(module name, its syntax tree, the metric classes it imports from prometheus_client) of
    every module in ``METRIC_PACKAGES`` that imports a metric class."""
    for package in METRIC_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            imported = {
                alias.asname or alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
                for alias in node.names
                if alias.name in METRIC_TYPES
            }
            if imported:
                module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
                yield module, tree, imported


def defined_families() -> dict[str, str]:
    """Every metric family a module constructs with a literal name: name -> module (the cross
    check that ``exported_names`` constructed them all)."""
    out: dict[str, str] = {}
    for module, tree, imported in metric_modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in imported
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                out[node.args[0].value] = module
    return out


def series_names(family: Any) -> set[str]:
    """The series names a collected family is exposed under."""
    name = family.name
    names = {name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names | {sample.name for sample in family.samples}


@cache
def exported() -> tuple[frozenset[str], frozenset[str]]:
    """(family names, series names) the code exports: every module that defines metrics is
    imported (module-level metrics register on the default registry), and the sidecar's, which
    ``sidecar/service.py`` creates per app on a registry of its own, on a fresh one."""
    for module, _, _ in metric_modules():
        importlib.import_module(module)
    from sidecar.service import SidecarMetrics

    sidecar = CollectorRegistry()
    SidecarMetrics(sidecar)
    families = [*REGISTRY.collect(), *sidecar.collect()]
    return (
        frozenset(f.name for f in families),
        frozenset(name for f in families for name in series_names(f)),
    )


# -- metric names in PromQL --------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_MODIFIER = re.compile(r"(?:\boffset\s+-?|@\s*)[\w.]+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_NAME_MATCHER = re.compile(r'\b__name__\s*(=~|=)\s*"([^"\\]*)"')
_METRIC_NAME = re.compile(r"[A-Za-z_:][\w:]*")
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    A regex reading, not a parser: it drops string literals (label values), Grafana variables,
    label matchers ``{...}``, ranges and subqueries ``[...]``, the label lists of ``by``,
    ``without``, ``on``, ``ignoring``, ``group_left`` and ``group_right``, ``offset`` and ``@``
    modifiers; of what is left, an identifier followed by ``(`` is a function or aggregation,
    and keywords, numbers (``1e3``, ``0x1f``) and ``Inf``/``NaN`` are skipped. A selector
    written ``{__name__="x"}`` or ``{__name__=~"x|y"}`` (how a Grafana variable reads a label
    of several metrics) selects the names it lists; a ``__name__`` regex that is not such a
    list raises ``ValueError`` (its names cannot be checked), negative ones are ignored. Limits:
    it does not validate PromQL (promtool does, in the tests below); Grafana's
    ``label_values(metric, label)`` must be unwrapped first (``variable_metric_names``), or its
    label would be read as a metric.
    """
    named: set[str] = set()
    for op, value in _NAME_MATCHER.findall(expr):
        for name in value.split("|") if op == "=~" else [value]:
            if not _METRIC_NAME.fullmatch(name):
                raise ValueError(f"__name__{op}{value!r}: not a list of metric names in {expr!r}")
            named.add(name)
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _MODIFIER.sub(" ", text)
    return named | {m for m in _IDENTIFIER.findall(text) if m.lower() not in KEYWORDS}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (model) (rate(a_total{model=~"$model", x="y{1}"}[$__rate_interval]))',
            {"a_total"},
        ),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m])))", {"b_bucket"}),
        (
            "sum(rate(c_total[5m])) by (le) > 1e3 and on (job, instance) d == bool 0x1f",
            {"c_total", "d"},
        ),
        (
            "e / ignoring (field) group_left (extra) f or vector(0) unless g offset 15m",
            {"e", "f", "g"},
        ),
        ("timestamp(h) - h > 10 and max_over_time(i[5m:1m]) < Inf", {"h", "i"}),
        ('label_replace(j, "dst", "$1", "src", "(.*)") @ 1609746000', {"j"}),
        ('up{job="x"} == 0 and k:recorded:rate5m', {"up", "k:recorded:rate5m"}),
        ('{__name__=~"l_total|m_count", model=~"$model"} or n', {"l_total", "m_count", "n"}),
        ('sum({__name__="o"}) unless {__name__!="p", __name__!~"q.*"}', {"o"}),
    ],
)
def test_metric_names_reads_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_metric_names_refuses_a_name_regex_it_cannot_list() -> None:
    with pytest.raises(ValueError, match="not a list of metric names"):
        metric_names('{__name__=~"triage_.*"}')


# -- what the dashboard and the rules query ----------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@cache
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*\w+\s*\)\s*$")


def variable_metric_names(variable: dict[str, Any]) -> set[str]:
    """The metrics a query variable reads: ``label_values(selector, label)``'s selector."""
    query = variable.get("query")
    query = query.get("query", "") if isinstance(query, dict) else query or ""
    match = LABEL_VALUES.match(query)
    assert match, f"variable {variable['name']}: unexpected query {query!r}"
    names = metric_names(match["selector"])
    assert names, f"variable {variable['name']}: no metric found in {query!r}"
    return names


def rule_test_series() -> list[str]:
    """The series the promtool unit tests feed the rules."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [series["series"] for test in tests for series in test["input_series"]]


def queried() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard panels and variables, rules, rule tests)."""
    uses: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric found in {expr!r}"
        for name in names:
            uses.setdefault(name, set()).add(f"panel {title!r}")
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            for name in variable_metric_names(variable):
                uses.setdefault(name, set()).add(f"variable {variable['name']}")
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, f"rule {rule['alert']}: no metric found in {rule['expr']!r}"
        for name in names:
            uses.setdefault(name, set()).add(f"rule {rule['alert']}")
    for series in rule_test_series():
        name = series.split("{")[0].strip()
        uses.setdefault(name, set()).add("alerts_test.yml")
    return uses


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    assert_ok(promtool("check", "rules", RULES))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    assert_ok(promtool("test", "rules", RULE_TESTS))


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_the_example_prometheus_configs_are_valid(config: Path, tmp_path: Path) -> None:
    """promtool checks each example config (``--syntax-only``: they name a credentials file
    that exists only where Prometheus runs); each has the jobs the alerts select ``up`` by."""
    loaded = yaml.safe_load(config.read_text())
    for job in loaded["scrape_configs"]:
        # Debian builds Prometheus without Kubernetes discovery, and its promtool rejects the
        # block: a static target stands in for it, the rest (relabelling, auth) is checked
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["kubernetes-pod.invalid:80"]}]
    checked = tmp_path / config.name
    checked.write_text(yaml.safe_dump(loaded))
    assert_ok(promtool("check", "config", "--syntax-only", checked))
    jobs = {job["job_name"] for job in loaded["scrape_configs"]}
    named = {job for rule in rules() for job in re.findall(r'\bup\{job="([^"]+)"\}', rule["expr"])}
    assert named, "no alert selects up by job: the check reads nothing"
    assert named <= jobs, f"alerts select jobs {sorted(named - jobs)} that {config.name} lacks"


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each panel query, as a recording rule, with Grafana's variables set."""
    queries = dashboard_queries()
    assert queries
    concrete = [
        _VARIABLE.sub(".*", re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr))
        for _, expr in queries
    ]
    recorded = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": expr}
                    for i, expr in enumerate(concrete)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(recorded))
    assert_ok(promtool("check", "rules", path))


# -- names -------------------------------------------------------------------------------------


def test_every_metric_the_code_defines_is_collected() -> None:
    """Cross-check of ``exported``: each metric a module constructs with a literal name is in a
    collected registry (a new class that takes a registry must be constructed there too)."""
    families, _ = exported()
    defined = defined_families()
    assert defined, "no metric definitions found: the AST scan is broken"
    missing = {name: module for name, module in defined.items() if name not in families}
    assert missing == {}


def test_every_queried_metric_is_exported_by_the_code() -> None:
    _, series = exported()
    uses = queried()
    assert uses
    unknown = {
        name: sorted(where)
        for name, where in uses.items()
        if name not in series and name not in PROMETHEUS_MADE
    }
    assert unknown == {}, "metrics no code exports (renamed or misspelt?)"


def test_shed_reasons_queried_are_the_gates_reasons() -> None:
    from plugins.admission.errors import ShedReason

    reasons = {r.value for r in ShedReason}
    texts = [expr for _, expr in dashboard_queries()] + [rule["expr"] for rule in rules()]
    texts += rule_test_series()
    used = {
        value
        for text in texts
        for selector in re.findall(r"triage_admission_shed_total\s*\{([^}]*)\}", text)
        for value in re.findall(r'reason\s*=\s*"([^"]*)"', selector)
    }
    assert used, "no shed reason queried: the check reads nothing"
    assert used <= reasons, f"unknown shed reasons: {sorted(used - reasons)}"


# -- the dashboard -----------------------------------------------------------------------------


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in all_panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_dashboard_queries_use_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "replica", "proxy", "sidecar"} <= set(variables)
    for panel in all_panels(dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s["uid"] == "${datasource}" for s in sources), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]


# -- the alerts --------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_for_severity_summary_description_and_runbook() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) == len(rules()), "recording rules belong in a file of their own"
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no for:"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(annotations), name
        doc, _, anchor = annotations["runbook"].partition("#")
        path = REPO_ROOT / doc
        assert path.is_file(), f"{name}: runbook {doc} does not exist"
        headings = re.findall(r"^#+\s+(.*)$", path.read_text(), re.MULTILINE)
        assert anchor in {github_anchor(h) for h in headings}, f"{name}: no #{anchor} in {doc}"
        for named in re.findall(r"[\w./-]+\.(?:md|py)\b", annotations["description"]):
            assert (REPO_ROOT / named).is_file(), f"{name}: {named} does not exist"


def test_every_alert_is_unit_tested() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in rules()}
    assert tested == alerts
    assert fired == alerts, f"never seen firing: {sorted(alerts - fired)}"
    assert quiet == alerts, f"never seen quiet: {sorted(alerts - quiet)}"
