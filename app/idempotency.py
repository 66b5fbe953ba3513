"""`Idempotency-Key` on POSTs that create things: a retried request gets the object the first one made.

The key is remembered per tenant and route with a hash of what the request asked for. The same key with
the same request returns the original object and creates nothing; with a different request it is a 422.
Keys are kept for KEEP_SECONDS (at least 24 h).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import APIError, InvalidRequest
from app.models import IdempotencyKey
from app.models.base import now

KEEP_SECONDS = 48 * 3600
MAX_KEY_LENGTH = 255


class IdempotencyKeyReused(APIError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "idempotency_key_reused"


def request_hash(payload: Any) -> str:
    """A stable hash of what a request asks for (JSON-able)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return key


def replayed_object_id(session: Session, tenant_id: str, route: str, key: str, digest: str) -> str | None:
    """The id of the object an earlier request with this key created, or None for a new key."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now() - KEEP_SECONDS))
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.route == route, IdempotencyKey.key == key
        )
    )
    if row is None:
        return None
    if row.request_hash != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key '{key}' was already used with a different request", param="Idempotency-Key"
        )
    return row.object_id


def remember(session: Session, tenant_id: str, route: str, key: str, digest: str, object_id: str) -> None:
    """Record the key in the transaction creating the object; a concurrent twin fails on the unique key."""
    session.add(
        IdempotencyKey(tenant_id=tenant_id, route=route, key=key, request_hash=digest, object_id=object_id)
    )
