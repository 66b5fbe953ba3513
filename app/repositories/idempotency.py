"""Remembered Idempotency-Keys: which object a tenant's request with a key created."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.models import IdempotencyKey
from app.models.base import now


def forget_older_than(session: Session, seconds: float) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now() - seconds))


def find(session: Session, tenant_id: str, route: str, key: str) -> IdempotencyKey | None:
    return session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.route == route, IdempotencyKey.key == key
        )
    )


def add(session: Session, tenant_id: str, route: str, key: str, digest: str, object_id: str) -> None:
    session.add(
        IdempotencyKey(tenant_id=tenant_id, route=route, key=key, request_hash=digest, object_id=object_id)
    )
