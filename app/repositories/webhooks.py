"""Webhook endpoints and their deliveries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row, Select, func, select, update
from sqlalchemy.orm import Session

from app.models import WebhookDelivery, WebhookEndpoint

PENDING = WebhookDelivery.PENDING


def add_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    session.add(endpoint)
    session.flush()


def endpoint_for_tenant(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id
    )
    return session.scalar(query)


def endpoints_query(tenant_id: str) -> Select:
    return select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)


def endpoints_of(session: Session, tenant_id: str) -> Sequence[WebhookEndpoint]:
    return session.scalars(endpoints_query(tenant_id).order_by(WebhookEndpoint.seq)).all()


def endpoint_count(session: Session, tenant_id: str) -> int:
    query = select(func.count()).where(WebhookEndpoint.tenant_id == tenant_id)
    return session.scalar(query) or 0


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint and, by cascade, its deliveries: a pending one is never sent."""
    session.delete(endpoint)
    session.flush()


def add_delivery(session: Session, delivery: WebhookDelivery) -> None:
    session.add(delivery)


def deliveries_query(endpoint_id: str) -> Select:
    return select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)


def any_due(session: Session, now: float) -> bool:
    """Whether a pending delivery is due: a read, so that an idle sender takes no write lock."""
    query = select(WebhookDelivery.seq).where(
        WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now
    )
    return session.scalar(query.limit(1)) is not None


def claim_due(session: Session, now: float, lease_until: float, limit: int) -> Sequence[Row]:
    """Claim up to `limit` pending deliveries due at `now`: their attempt is counted and they are not due
    again before `lease_until` (sooner, if the attempt's outcome is recorded). One statement, so two API
    processes never claim the same delivery: PostgreSQL skips rows another claim holds (`SKIP LOCKED`), and
    SQLite runs one writer at a time. Returns each claimed delivery's id, attempt, body, url and secret."""
    due = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(due),
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=lease_until)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    )
    ids = list(claimed.scalars())
    if not ids:
        return []
    query = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.attempts,
            WebhookDelivery.body,
            WebhookEndpoint.url,
            WebhookEndpoint.secret,
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id.in_(ids))
    )
    return session.execute(query).all()


def record_attempt(session: Session, delivery_id: str, attempt: int, values: Mapping[str, Any]) -> bool:
    """Write the outcome of attempt `attempt`, unless the delivery has moved on since (its claim lapsed and
    another attempt was claimed): True if written."""
    statement = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.attempts == attempt,
            WebhookDelivery.status == PENDING,
        )
        .values(values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined]


def pending_count(session: Session) -> int:
    query = select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == PENDING)
    return session.scalar(query) or 0
