"""Dependencies point one way: server -> protocol -> session -> model (engine); session -> cache.
The store is used through its public methods only, and no function grows past 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Package -> the project packages it must not import.
FORBIDDEN = {
    "model": {"cache", "session", "protocol", "server"},
    "cache": {"model", "session", "protocol", "server"},
    "session": {"protocol", "server"},
    "protocol": {"server", "cache"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_packages(path) & FORBIDDEN[package]
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"{package}/ imports what it must not: {bad}"


def test_the_store_is_used_through_its_public_methods():
    bad = []
    for package in ("session", "server", "protocol"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "._call" in line or ".backend." in line:
                    bad.append(f"{path.relative_to(ROOT)}:{n}")
    assert not bad, f"private parts of the store used outside cache/: {bad}"


def test_no_function_outside_bench_is_over_60_lines():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("bench", "tests", ".venv", "var") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over 60 lines: {long}"
