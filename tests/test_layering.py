"""The API's layers, checked on its source: SQL lives in app/repositories, and only the unit of work
(app/db.py) commits."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"
# Where query building is allowed: the repositories, the engine and unit of work, the table definitions.
SQL_OWNERS = ("repositories/", "db.py", "models/")
QUERY_BUILDERS = {"select", "update", "delete", "insert", "func", "or_", "and_", "text", "exists"}


def modules() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(APP)), ast.parse(path.read_text())) for path in sorted(APP.rglob("*.py"))]


def test_only_repositories_build_queries() -> None:
    offenders = [
        f"{name}: from {node.module} import {alias.name}"
        for name, tree in modules()
        if not name.startswith(SQL_OWNERS)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy")
        for alias in node.names
        if alias.name in QUERY_BUILDERS
    ]
    assert offenders == []


def test_only_the_unit_of_work_commits() -> None:
    offenders = [
        f"{name}:{node.lineno}"
        for name, tree in modules()
        if name != "db.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"commit", "rollback"}
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "session"
    ]
    assert offenders == []


def test_the_check_sees_a_query_outside_the_repositories(tmp_path: Path) -> None:
    """The scan above is not vacuous: it finds what it looks for."""
    tree = ast.parse("from sqlalchemy import select\nsession.commit()\n")
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    commits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.func.attr == "commit"]
    assert "select" in imports and QUERY_BUILDERS & set(imports) and commits
