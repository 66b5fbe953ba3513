"""Webhook endpoints and their deliveries."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, Select, delete, func, select, update
from sqlalchemy.orm import Session

from app.models import WebhookDelivery, WebhookEndpoint

PENDING = WebhookDelivery.PENDING
SETTLED = (WebhookDelivery.DELIVERED, WebhookDelivery.FAILED)


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


def endpoints_to_announce(session: Session, tenant_id: str) -> Sequence[WebhookEndpoint]:
    """The tenant's endpoints, held until the transaction ends (PostgreSQL's `FOR KEY SHARE`): one deleted
    meanwhile would otherwise fail the transition's commit on its deliveries' foreign key. A delete waits for
    the commit instead, and takes the deliveries it wrote with it."""
    query = (
        endpoints_query(tenant_id).order_by(WebhookEndpoint.seq).with_for_update(read=True, key_share=True)
    )
    return session.scalars(query).all()


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


def claim_due(
    session: Session, now: float, lease_until: float, limit: int, busy_tenants: Collection[str] = ()
) -> Sequence[Row]:
    """Claim up to `limit` pending deliveries due at `now`, the most overdue of each tenant not in
    `busy_tenants` (so that one tenant's backlog, or its endpoints that hang, never fills a sender's slots):
    their attempt is counted and they are not due again before `lease_until` (sooner, if the attempt's outcome
    is recorded). Two API processes never claim the same delivery: the claiming UPDATE re-checks that each is
    still due, on rows PostgreSQL locks with `SKIP LOCKED` (another claim holds the rest), and SQLite runs one
    writer at a time. Returns each claimed delivery's id, attempt, body, url, secret and tenant_id."""
    tenant_id = WebhookEndpoint.tenant_id
    due = (WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
    ranked = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.next_attempt_at,
            func.row_number()
            .over(partition_by=tenant_id, order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.seq))
            .label("rank"),
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(*due, tenant_id.not_in(busy_tenants))
        .subquery()
    )
    picked = session.scalars(
        select(ranked.c.id).where(ranked.c.rank == 1).order_by(ranked.c.next_attempt_at).limit(limit)
    ).all()
    if not picked:
        return []
    lockable = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.id.in_(picked), *due)
        .with_for_update(skip_locked=True)
    )
    claimed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(lockable), *due)
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
            tenant_id,
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


def forget_settled(session: Session, before: int) -> int:
    """Delete the deliveries delivered or given up on that were created before `before`: how many."""
    statement = (
        delete(WebhookDelivery)
        .where(WebhookDelivery.status.in_(SETTLED), WebhookDelivery.created_at < before)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount  # type: ignore[attr-defined]


def pending_count(session: Session) -> int:
    query = select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == PENDING)
    return session.scalar(query) or 0
