"""Cursor pagination over tables with a public `id` and an ordering integer `seq`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest

Item = TypeVar("Item")
MAX_LIMIT = 100


class ListPage(BaseModel, Generic[Item]):
    """One page of a list; a route declares its concrete subclass (e.g. `FileList(ListPage[FileObject])`)."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool = Field(description="More objects follow; ask for them with `after=<last_id>`.")
    first_id: str | None
    last_id: str | None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}", param="limit", code="invalid_value")
    return limit


def paginate(
    session: Session,
    query: Select,
    table: Any,
    *,
    limit: int,
    after: str | None,
    newest_first: bool,
    render: Callable[[Any], Item],
) -> ListPage[Item]:
    """One page of `query` after the row whose id is `after`. Cursors stay valid as rows are added."""
    check_limit(limit)
    if after is not None:
        # Looked up through the caller's filtered query, so another tenant's id is no valid cursor.
        after_seq = session.scalar(query.with_only_columns(table.seq).where(table.id == after))
        if after_seq is None:
            raise InvalidRequest(
                f"No object with id '{after}' to page after", param="after", code="invalid_cursor"
            )
        query = query.where(table.seq < after_seq if newest_first else table.seq > after_seq)
    query = query.order_by(table.seq.desc() if newest_first else table.seq.asc()).limit(limit + 1)
    rows: Sequence[Any] = session.scalars(query).all()
    page = rows[:limit]
    return ListPage(
        data=[render(row) for row in page],
        has_more=len(rows) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
