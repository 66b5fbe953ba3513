"""Pages of a list in OpenAI's shape; the SQL behind them is app.repositories.pagination."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, Field
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
from app.repositories import pagination

Item = TypeVar("Item")
Page = TypeVar("Page", bound="ListPage[Any]")
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
    session: Session, query: Select, *, limit: int, after: str | None, newest_first: bool, into: type[Page]
) -> Page:
    """One page of `query` after the row whose id is `after`, as the list type `into`, each row made into
    its item type with `from_row`."""
    rows, has_more = pagination.page(
        session, query, limit=check_limit(limit), after=after, newest_first=newest_first
    )
    (item,) = get_args(into.model_fields["data"].annotation)
    return into(
        data=[item.from_row(row) for row in rows],
        has_more=has_more,
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
    )
