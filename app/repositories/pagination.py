"""Cursor pages over tables with a public `id` and an ordering integer `seq`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest


def page(
    session: Session, query: Select, *, limit: int, after: str | None, newest_first: bool
) -> tuple[Sequence[Any], bool]:
    """Up to `limit` rows of `query` (of one table) after the row whose id is `after`, and whether more
    follow. Cursors stay valid as rows are added."""
    table = query.column_descriptions[0]["entity"]
    if after is not None:
        # Looked up through the caller's filtered query, so another tenant's id is no valid cursor.
        after_seq = session.scalar(query.with_only_columns(table.seq).where(table.id == after))
        if after_seq is None:
            raise InvalidRequest(
                f"No object with id '{after}' to page after", param="after", code="invalid_cursor"
            )
        query = query.where(table.seq < after_seq if newest_first else table.seq > after_seq)
    query = query.order_by(table.seq.desc() if newest_first else table.seq.asc()).limit(limit + 1)
    rows = session.scalars(query).all()
    return rows[:limit], len(rows) > limit
