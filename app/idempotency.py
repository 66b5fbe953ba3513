"""`Idempotency-Key` on POSTs that create things: a retried request gets the object the first one made.

The key is remembered per tenant and route with a hash of what the request asked for. The same key with
the same request returns the original object and creates nothing; with a different request it is a 422.
Keys are kept for KEEP_SECONDS (at least 24 h). `create_once` is the one way a route creates something
under a key, for every route that accepts one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError, InvalidRequest
from app.repositories import idempotency as keys

T = TypeVar("T")

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


def create_once(
    session: Session,
    tenant_id: str,
    route: str,
    key: str | None,
    request: Any,
    *,
    create: Callable[[], T],
    object_id: Callable[[T], str],
    load: Callable[[str], T],
    discard: Callable[[T], None] = lambda _: None,
) -> T:
    """`create()`, remembered under `key` with a hash of `request`; a repeat of the request returns
    `load(id)` of what the first one created. A concurrent twin is settled by the unique key: the loser's
    insert fails (on PostgreSQL once the winner has committed), its own object is rolled back to a savepoint
    and `discard`ed, and it answers with the winner's."""
    if key is None:
        return create()
    key, digest = check_key(key), request_hash(request)
    if existing := replayed_object_id(session, tenant_id, route, key, digest):
        return load(existing)
    savepoint = session.begin_nested()
    created = create()
    try:
        keys.add(session, tenant_id, route, key, digest, object_id(created))
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        discard(created)
        winner = replayed_object_id(session, tenant_id, route, key, digest)
        if winner is None:
            raise
        return load(winner)
    savepoint.commit()
    return created


def replayed_object_id(session: Session, tenant_id: str, route: str, key: str, digest: str) -> str | None:
    """The id of the object an earlier request with this key created, or None for a new key."""
    keys.forget_older_than(session, KEEP_SECONDS)
    row = keys.find(session, tenant_id, route, key)
    if row is None:
        return None
    if row.request_hash != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key '{key}' was already used with a different request", param="Idempotency-Key"
        )
    return row.object_id
