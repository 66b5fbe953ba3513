"""Engine, session factory and the unit of work. The schema comes only from Alembic migrations
(`phitune migrate`).

A unit of work (`session_scope`) is the only place that commits: one per API request (app.deps) and one per
round of a background loop. Services add to its session and never commit; what must happen only once the
commit succeeded (delete a replaced blob, send a job's message) is registered with `after_commit`, and what
must be undone if it fails (a blob moved into place) with `on_rollback`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from typing import TypeVar

from anyio import CancelScope, CapacityLimiter, to_thread
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")
AFTER_COMMIT, ON_ROLLBACK = "phitune.after_commit", "phitune.on_rollback"


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One pooled engine per database URL."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40, max_overflow=10
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # As many connections kept as the API has threads (40), and more: a request holds its connection across
    # threadpool hops (auth, route, commit), so a smaller pool starves under a burst of requests, and
    # connections beyond pool_size are closed when returned (a reconnect per request under load).
    return create_engine(url, pool_pre_ping=True, pool_size=40, max_overflow=10)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API's event stream read while a worker report writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A unit of work: committed on success, rolled back on error, then its callbacks run."""
    session = get_sessionmaker(url)()
    try:
        try:
            yield session
            session.flush()
        except BaseException:
            session.rollback()
            _run(session.info.pop(ON_ROLLBACK, []))
            raise
        try:
            session.commit()
        except BaseException:
            # Whether a COMMIT that failed took effect is unknown (the connection may have dropped after
            # the database committed): keep the blobs. An orphan blob is harmless; a row without one is not.
            if session.info.get(ON_ROLLBACK):
                log.warning("commit failed; keeping the blobs it would have removed on a rollback")
            session.rollback()
            raise
    finally:
        session.close()
    _run(session.info.pop(AFTER_COMMIT, []))


@asynccontextmanager
async def async_session_scope(url: str) -> AsyncIterator[Session]:
    """`session_scope` entered from async code: the session is made on the event loop (no I/O until it is
    first used) and its end (flush, commit or rollback, close, callbacks) runs in a worker thread, one
    threadpool hop per request instead of two; none when the route ended its read-only transaction itself
    (`release_connection`)."""
    scope = session_scope(url)
    session = scope.__enter__()
    try:
        yield session
    except BaseException as error:
        if not await _end(scope.__exit__, type(error), error, error.__traceback__):
            raise
    else:
        if _idle(session):
            scope.__exit__(None, None, None)  # nothing to flush, commit or call back: no I/O, no hop
        else:
            await _end(scope.__exit__, None, None, None)


async def _end(exit_scope: Callable[..., bool | None], *details: object) -> bool | None:
    """End a unit of work in a thread of its own, as FastAPI ends a sync dependency: shielded, so a
    cancelled request still commits or rolls back and returns its connection, and outside the shared
    threadpool, so a request holding a connection never waits for a thread that routes waiting for a
    connection hold."""
    with CancelScope(shield=True):
        handled = await to_thread.run_sync(exit_scope, *details, limiter=CapacityLimiter(1))
    return handled


def _idle(session: Session) -> bool:
    """True for a session with no transaction (never used, or ended by `release_connection`) and nothing
    pending: ending it does no I/O."""
    return not (session.in_transaction() or _has_writes(session))


def _has_writes(session: Session) -> bool:
    """Objects added, changed or deleted but not flushed, or work waiting for the commit."""
    return bool(session.new or session.dirty or session.deleted or session.info.get(AFTER_COMMIT))


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the unit of work owning `session` has committed (never if it rolls back)."""
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


def on_rollback(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` if the unit of work owning `session` rolls back, e.g. to remove a blob whose row
    was never committed."""
    session.info.setdefault(ON_ROLLBACK, []).append(callback)


def release_connection(session: Session) -> None:
    """End a unit of work's read-only transaction, so that no pooled connection (and on PostgreSQL no row
    lock) is held while a route waits on something slow: a body streaming in, a model generating. The
    session starts a new transaction when next used. Only for a session that has written nothing yet."""
    if _has_writes(session):
        raise RuntimeError("release_connection would commit pending writes")
    session.commit()


async def read(url: str, query: Callable[..., T], *args: object) -> T:
    """`query(connection, *args)` outside any unit of work, for a read-only route that pollers call: a
    pooled connection, no ORM session. On SQLite it runs on the event loop (a local file read takes
    microseconds, and in WAL mode a reader never waits for a writer), which spares the threadpool hop that
    under 64 concurrent pollers cost more than the query; on a database across a network, in a thread."""
    if url.startswith("sqlite"):
        return _read(url, query, *args)
    return await to_thread.run_sync(_read, url, query, *args)


def _read(url: str, query: Callable[..., T], *args: object) -> T:
    connection: Connection
    with get_engine(url).connect() as connection:
        return query(connection, *args)


def check_database(url: str) -> None:
    """Raise unless the database answers (for /readyz)."""
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT 1"))


def _run(callbacks: list[Callable[[], object]]) -> None:
    # The transaction is already decided; a failing callback (a blob that cannot be deleted) is logged,
    # never turned into an error for a request whose writes did commit.
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("unit-of-work callback %r failed", callback)
