"""The folders show the data flow (ARCHITECTURE.md): each top-level package imports only the
layers below it. ``core`` is the ground floor; the production parts (``sidecar``, ``plugins``)
stand on it alone; the dev stack, the engine builder and the benchmarks may use those; the
``triage`` CLI sits on top of everything. The Triton models run inside Triton's python backend
and import none of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.paths import REPO_ROOT

OURS = {"core", "sidecar", "plugins", "devstack", "build_engines", "loadtests", "triage"}
ALLOWED = {
    "core": {"core"},
    "sidecar": {"core", "sidecar"},
    "plugins": {"core", "plugins"},
    "devstack": {"core", "sidecar", "plugins", "devstack"},
    "build_engines": {"core", "sidecar", "plugins", "devstack", "build_engines"},
    "loadtests": {"core", "sidecar", "plugins", "devstack", "loadtests"},
    "triage": OURS,
    "triton_models": set(),
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that ``path`` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & OURS
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    files = sorted((REPO_ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no Python files"
    wrong = {
        str(f.relative_to(REPO_ROOT)): sorted(imported_packages(f) - ALLOWED[layer]) for f in files
    }
    assert {f: w for f, w in wrong.items() if w} == {}
