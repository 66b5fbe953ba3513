"""The API's layers, checked on its source: SQL lives in app/repositories, and only the unit of work
(app/db.py) commits or rolls back."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"
# Where SQL may be built and run: the repositories, the engine and unit of work, the table definitions.
SQL_OWNERS = ("repositories/", "db.py", "models/")
QUERY_BUILDERS = {"select", "update", "delete", "insert", "func", "or_", "and_", "text", "exists"}
# Methods that run or shape a query: on a session, a statement or a column.
QUERY_METHODS = {"execute", "scalar", "scalars", "query", "where", "with_for_update", "order_by", "group_by"}
# `Storage.commit` moves a blob into place, and a savepoint is part of the unit of work it belongs to.
NOT_TRANSACTIONS = ("storage", "savepoint")


def modules(root: Path) -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(root)), ast.parse(path.read_text())) for path in sorted(root.rglob("*.py"))]


def receiver(call: ast.Call) -> str:
    """The source text of what a method is called on (`session`, `self.storage`, …)."""
    return ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""


def sql_outside_repositories(root: Path) -> list[str]:
    found = []
    for name, tree in modules(root):
        if name.startswith(SQL_OWNERS):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                found += [f"{name}: imports {a.name}" for a in node.names if a.name in QUERY_BUILDERS]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in QUERY_METHODS:
                found.append(f"{name}:{node.lineno}: {receiver(node)}.{node.func.attr}()")
    return found


def transactions_outside_the_unit_of_work(root: Path) -> list[str]:
    return [
        f"{name}:{node.lineno}: {receiver(node)}.{node.func.attr}()"
        for name, tree in modules(root)
        if name != "db.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"commit", "rollback"}
        and not any(word in receiver(node) for word in NOT_TRANSACTIONS)
    ]


def test_only_repositories_build_or_run_queries() -> None:
    assert sql_outside_repositories(APP) == []


def test_only_the_unit_of_work_commits() -> None:
    assert transactions_outside_the_unit_of_work(APP) == []


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    (tmp_path / "repositories").mkdir()
    (tmp_path / "repositories" / "jobs.py").write_text("from sqlalchemy import select\nsession.execute(q)\n")
    (tmp_path / "service.py").write_text(
        "from sqlalchemy import select, update\n"
        "def f(db, storage):\n"
        "    db.scalar(select(Job).where(Job.id == 1))\n"
        "    db.commit()\n"
        "    storage.commit(temp, key)\n"
    )
    assert sql_outside_repositories(tmp_path) == [
        "service.py: imports select",
        "service.py: imports update",
        "service.py:3: db.scalar()",
        "service.py:3: select(Job).where()",
    ]
    assert transactions_outside_the_unit_of_work(tmp_path) == ["service.py:4: db.commit()"]
