"""The repository stands alone: every relative link in its Markdown, and every path of ours a
doc or a docstring names in backticks (``plugins/request_ticket.py``), points to a file that
exists."""

from __future__ import annotations

import re
import subprocess

from core.paths import REPO_ROOT

TOP = (
    "core",
    "sidecar",
    "plugins",
    "devstack",
    "triage",
    "loadtests",
    "build_engines",
    "triton_models",
    "tests",
    "redis",
    "scripts",
)
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)")
NAMED = re.compile(r"`((?:\.\./)*(?:" + "|".join(TOP) + r")/[\w./-]*\w)`")


def tracked(suffixes: tuple[str, ...]) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [f for f in out if f.endswith(suffixes) and not f.startswith("loadtests/results/")]


def missing_targets(doc: str) -> list[str]:
    path = REPO_ROOT / doc
    text = path.read_text()
    missing = []
    for target in LINK.findall(text) if doc.endswith(".md") else []:
        file = target.split("#")[0]
        if file and not (path.parent / file).exists():
            missing.append(target)
    for name in NAMED.findall(text):
        if "*" in name or "{" in name:
            continue
        relative = (path.parent / name) if name.startswith("..") else (REPO_ROOT / name)
        if not relative.exists():
            missing.append(name)
    return missing


def test_every_doc_reference_points_to_a_file_that_exists() -> None:
    broken = {doc: m for doc in tracked((".md", ".py", ".lua")) if (m := missing_targets(doc))}
    assert broken == {}
