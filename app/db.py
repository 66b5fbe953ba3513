"""Engine, session factory and the unit of work. The schema comes only from Alembic migrations
(`phitune migrate`).

A unit of work (`session_scope`) is the only place that commits: one per API request (app.deps) and one per
round of a background loop. Services add to its session and never commit; what must happen only once the
commit succeeded (delete a replaced blob, send a job's message) is registered with `after_commit`, and what
must be undone if it fails (a blob moved into place) with `on_rollback`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

import psycopg
from anyio import CancelScope, CapacityLimiter, to_thread
from psycopg.types.string import TextLoader
from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    PoolProxiedConnection,
    Row,
    Select,
    String,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeEngine

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class OneRow:
    """A read of the row (at most one) whose `key` columns equal the arguments, given in the order of their
    parameters' `names` (`condition`): what `read` runs. Called with a SQLAlchemy connection, it runs
    there."""

    statement: Select
    condition: ColumnElement[bool]
    names: tuple[str, ...]
    key: tuple[ColumnElement, ...]

    @classmethod
    def where(
        cls, columns: Sequence[ColumnElement], **key: ColumnElement | QueryableAttribute[Any]
    ) -> OneRow:
        """`columns` of the row whose columns `key` names equal the parameters so named."""
        condition = and_(*(column == bindparam(name) for name, column in key.items()))
        key_columns = tuple(column.expression for column in key.values())
        return cls(select(*columns).where(condition), condition, tuple(key), key_columns)

    def __call__(self, connection: Connection, *args: object) -> Row | None:
        return connection.execute(self.statement, dict(zip(self.names, args, strict=True))).first()


async def read(url: str, query: OneRow, *args: object) -> Row | None:
    """`query` outside any unit of work, for a read-only route that pollers call: no ORM session, no
    transaction of its own, and no threadpool hop, which under 64 concurrent pollers cost more than the query.
    On SQLite it runs on the event loop, on a connection the loop keeps (`_SQLiteReads`); on PostgreSQL
    (psycopg) on raw asyncio connections the loop keeps (`_RawReads`), its I/O awaited; with another driver
    in a thread (`_ThreadReads`)."""
    return await _reads(url).fetch_one(query, args)


class _SQLiteReads:
    """One pysqlite connection, kept by the event loop, for the reads it runs itself: a local file read takes
    microseconds, and in WAL mode a reader never waits for a writer. No pool checkout and return per read, and
    no SQLAlchemy execution context (its Result and per-execution setup cost ~20 % of a poll's CPU): the
    statement is compiled once, run on the DBAPI connection, and each value converted by the result processor
    SQLAlchemy would apply (JSON, Boolean). Never stale: pysqlite begins no transaction for a SELECT, so each
    read sees what was committed before it, and its statement ends (its snapshot let go) once its row is
    read."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: PoolProxiedConnection | None = None  # the pool's: its connect event set the pragmas
        self._compiled: dict[Select, _SQLiteStatement] = {}

    async def fetch_one(self, query: OneRow, args: tuple[object, ...]) -> Row | None:
        statement = self._compiled.get(query.statement) or self._compile(query)
        params = dict(zip(query.names, args, strict=True))
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        try:
            cursor = self._connection.driver_connection.execute(  # type: ignore[union-attr]
                statement.sql, [params[name] for name in statement.binds]
            )
            try:
                raw = cursor.fetchone()
            finally:
                cursor.close()
        except sqlite3.Error as error:
            raise _wrapped(statement.sql, params, error, sqlite3.Error) from error
        return None if raw is None else cast(Row, statement.rows.made_from(raw))

    def _compile(self, query: OneRow) -> _SQLiteStatement:
        dialect = self._engine.dialect
        compiled = query.statement.compile(dialect=dialect)
        if any(bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in compiled.binds.values()):
            raise TypeError(f"SQLAlchemy converts a parameter of this statement on SQLite: {query.statement}")
        processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in query.statement.selected_columns
        ]
        self._compiled[query.statement] = statement = _SQLiteStatement(
            sql=str(compiled),
            binds=tuple(compiled.positiontup or ()),
            rows=_KeptRows.of(query.statement, processors),
        )
        return statement

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


@dataclass(frozen=True)
class _KeptRows:
    """The rows a statement's raw driver rows become: each value converted as SQLAlchemy would convert
    it, into the named tuple read as a SQLAlchemy Row is (by label; never to be changed). A raw row (str, int,
    float, bytes, datetime, None: hashable) is kept with the row made from it, so an unchanged row is
    converted once (JSON decoding was ~9 % of a poll's CPU in the app) and read as the same object, which
    callers then may keep what they make of (app.jobs.routes). A changed row is a new key: never stale."""

    converts: tuple[Callable[[object], object], ...]
    row: Callable[..., tuple]
    kept: dict[tuple, tuple] = field(default_factory=dict)

    @classmethod
    def of(cls, statement: Select, converts: Sequence[Callable[[Any], object] | None]) -> _KeptRows:
        columns = [str(column.key) for column in statement.selected_columns]
        return cls(tuple(convert or _as_is for convert in converts), namedtuple("Row", columns))

    def made_from(self, raw: tuple) -> tuple:
        if (row := self.kept.get(raw)) is None:
            if len(self.kept) >= KEPT_ROWS:
                self.kept.clear()
            converted = (convert(value) for convert, value in zip(self.converts, raw, strict=True))
            row = self.kept[raw] = self.row(*converted)
        return row


@dataclass(frozen=True)
class _SQLiteStatement:
    """A statement compiled for pysqlite: its SQL, its parameters' names in order, and its rows."""

    sql: str
    binds: tuple[str, ...]
    rows: _KeptRows


def _as_is(value: object) -> object:
    return value


class _ThreadReads:
    """A pooled connection in a worker thread: for a driver with no asyncio form."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def fetch_one(self, query: OneRow, args: tuple[object, ...]) -> Row | None:
        return await to_thread.run_sync(self._fetch_one, query, args)

    def _fetch_one(self, query: OneRow, args: tuple[object, ...]) -> Row | None:
        with self._engine.connect() as connection:
            return query(connection, *args)

    async def close(self) -> None:
        pass


class _RawReads:
    """psycopg's own asyncio connections, at most `size`, in autocommit, each running one statement at a time.

    SQLAlchemy's asyncio layer cost ~350 µs of CPU a read (its pool checkout alone ~140 µs), psycopg's own
    connection ~75 µs. What SQLAlchemy still owns: the SQL (compiled once from the statement for the engine's
    dialect), the connection arguments (the engine's), and the errors (psycopg's, raised as SQLAlchemy's,
    which app.errors answers). Rows are made as `_KeptRows` makes them, JSON decoded here (psycopg hands it
    over as text) with the values SQLAlchemy would give: only a statement whose types SQLAlchemy otherwise
    leaves to psycopg runs here.

    Reads share round trips, never a stale one: reads of a statement that arrive while one of it is in flight
    wait for the next, which starts once that one ends and fetches every row they asked for at once (the key
    columns matched against arrays of the arguments). So a row is never older than the read that asked for it
    (a write acknowledged before the read began is seen), and 64 pollers cost the database and this process
    about one query per round trip, not one each: the psycopg round trip was half a poll's CPU."""

    def __init__(self, engine: Engine, size: int) -> None:
        self._dialect = engine.dialect
        self._connect_args = engine.dialect.create_connect_args(engine.url)
        self._json = engine.dialect._json_deserializer or json.loads
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(size)
        self._compiled: dict[Select, _RawStatement] = {}
        self._flying: dict[Select, _Flight] = {}  # a statement's round trip in flight
        self._next: dict[Select, _Flight] = {}  # the one after it, which reads join until it starts

    async def fetch_one(self, query: OneRow, args: tuple[object, ...]) -> Row | None:
        statement = self._compiled.get(query.statement) or self._compile(query)
        if not _shareable(args):  # its error is its own, never that of the reads it would share with
            alone = await self._fetch_one(statement, args)
            return None if alone is None else cast(Row, statement.rows.made_from(alone))
        if (flight := self._next.get(query.statement)) is None:
            ahead = self._flying.get(query.statement)
            flight = _Flight()
            flight.task = asyncio.ensure_future(self._fly(query.statement, flight, ahead, statement))
            flight.task.add_done_callback(_retrieved)
            (self._flying if ahead is None else self._next)[query.statement] = flight
        flight.asked[args] = None
        # Shielded: a caller that goes away (a client disconnects) leaves the round trip to those sharing it.
        answer = (await asyncio.shield(flight.task))[args]
        return None if answer is None else cast(Row, statement.rows.made_from(answer))

    async def _fly(
        self, key: Select, flight: _Flight, ahead: _Flight | None, statement: _RawStatement
    ) -> dict[tuple, tuple | None]:
        if ahead is not None:
            await asyncio.wait([ahead.task])  # its outcome is its callers'
            del self._next[key]
            self._flying[key] = flight
        asked = list(flight.asked)  # no read joins it from here on
        try:
            if len(asked) == 1:
                return {asked[0]: await self._fetch_one(statement, asked[0])}
            return await self._fetch_many(statement, asked)
        finally:
            if self._flying.get(key) is flight:
                del self._flying[key]

    async def _fetch_many(self, statement: _RawStatement, asked: list[tuple]) -> dict[tuple, tuple | None]:
        arrays = {name: [args[i] for args in asked] for i, name in enumerate(statement.names)}
        # An error is every read's: the values the database refuses never get here (`_shareable`).
        rows = await self._fetch(statement.sql_many, arrays, many=True)
        width = len(statement.rows.converts)
        found = {row[width:]: row[:width] for row in rows}  # each row ends with its key's values
        return {args: found.get(args) for args in asked}

    async def _fetch_one(self, statement: _RawStatement, args: tuple) -> tuple | None:
        return await self._fetch(statement.sql, dict(zip(statement.names, args, strict=True)), many=False)

    async def _fetch(self, sql: str, params: Mapping[str, object], *, many: bool) -> Any:
        async with self._slots:
            while True:
                kept = bool(self._idle)
                try:
                    connection = self._idle.pop() if kept else await self._open()
                except psycopg.Error as error:
                    raise _wrapped(sql, params, error) from error
                try:
                    cursor = await connection.execute(sql, params)
                    fetched = await (cursor.fetchall() if many else cursor.fetchone())
                except psycopg.Error as error:
                    if not connection.broken:  # a failed statement leaves an autocommit connection usable
                        self._idle.append(connection)
                    else:
                        await _close(connection)
                        if kept:
                            # Dropped by the server while kept (a restart): the read changes nothing, so it is
                            # tried again, at worst on a new connection. What pool_pre_ping does, without its
                            # round trip on every read.
                            continue
                    raise _wrapped(sql, params, error) from error
                except BaseException:
                    await _close(connection)  # cancelled mid-read (the app stopping): state unknown
                    raise
                self._idle.append(connection)
                return fetched

    async def close(self) -> None:
        for flight in [*self._flying.values(), *self._next.values()]:
            flight.task.cancel()
        while self._idle:
            await _close(self._idle.pop())

    async def _open(self) -> psycopg.AsyncConnection:
        args, kwargs = self._connect_args
        connection = await psycopg.AsyncConnection.connect(*args, **kwargs, autocommit=True)
        for json_type in ("json", "jsonb"):  # as text: a row is kept by its raw values (`_KeptRows`)
            connection.adapters.register_loader(json_type, TextLoader)
        return connection

    def _compile(self, query: OneRow) -> _RawStatement:
        compiled = query.statement.compile(dialect=self._dialect)
        result_types = [column.type for column in query.statement.selected_columns]
        if _converts(self._dialect, result_types, compiled):
            raise TypeError(
                f"SQLAlchemy converts values of this statement on {self._dialect.name}: {query.statement}"
            )
        if not all(isinstance(column.type, String) for column in query.key):
            raise TypeError(
                f"a key column is no string: rows of many reads are matched by equal strings: {query}"
            )
        # The same columns, then the key's, of every row whose key is among the arrays' (zipped by unnest).
        arrays = [func.unnest(bindparam(name, type_=ARRAY(String()))) for name in query.names]
        many = select(*query.statement.selected_columns, *query.key).where(
            tuple_(*query.key).in_(select(*arrays))
        )
        converts = [self._decode if isinstance(type_, JSON) else None for type_ in result_types]
        self._compiled[query.statement] = statement = _RawStatement(
            sql=str(compiled),
            sql_many=str(many.compile(dialect=self._dialect)),
            names=query.names,
            rows=_KeptRows.of(query.statement, converts),
        )
        return statement

    def _decode(self, value: str | None) -> object:
        return None if value is None else self._json(value)


@dataclass(frozen=True)
class _RawStatement:
    """A `OneRow` compiled for psycopg: its SQL for one row and for many (the parameters arrays), its
    parameters' names, and its rows."""

    sql: str
    sql_many: str
    names: tuple[str, ...]
    rows: _KeptRows


class _Flight:
    """One round trip of a statement, and the reads it answers: their arguments → a raw row, or None (no
    row)."""

    task: asyncio.Task[dict[tuple, tuple | None]]

    def __init__(self) -> None:
        self.asked: dict[tuple, None] = {}  # an ordered set


def _shareable(args: tuple[object, ...]) -> bool:
    """Arguments a shared round trip can carry: strings the database can hold (no NUL, valid UTF-8). Others
    fail in psycopg, which would fail every read sharing the round trip."""
    try:
        return all(isinstance(arg, str) and "\x00" not in arg and arg.encode() is not None for arg in args)
    except UnicodeEncodeError:  # a lone surrogate
        return False


def _retrieved(task: asyncio.Task) -> None:
    """Mark a shared round trip's outcome as seen: every caller of it may have gone away."""
    if not task.cancelled():
        task.exception()


def _converts(dialect: Dialect, result_types: list[TypeEngine], compiled: SQLCompiler) -> bool:
    """Whether SQLAlchemy converts a value of the statement, a result's or a parameter's, on this dialect."""
    return any(type_.dialect_impl(dialect).result_processor(dialect, None) for type_ in result_types) or any(
        bind.type.dialect_impl(dialect).bind_processor(dialect) for bind in compiled.binds.values()
    )


async def _close(connection: psycopg.AsyncConnection) -> None:
    with CancelScope(shield=True):
        await connection.close()


def _wrapped(
    sql: str, params: Mapping[str, object], error: Exception, driver_error: type[Exception] = psycopg.Error
) -> StatementError:
    """The driver's error as SQLAlchemy raises it (DataError, OperationalError, …)."""
    return DBAPIError.instance(sql, params, error, driver_error)


KEPT_ROWS = 1024  # per statement, of the rows SQLite reads were last answered with
READ_CONNECTIONS = 10  # each is held for one round trip only: a few serve many pollers

# A loop's kept connections are used by that loop only (psycopg's asyncio ones belong to the loop that
# opened them): one reader per loop and URL (the API has one loop; tests start one per app), closed when the
# app stops (`close_reads`).
_LOOP_READS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, _SQLiteReads | _RawReads | _ThreadReads]
] = weakref.WeakKeyDictionary()


def _reads(url: str) -> _SQLiteReads | _RawReads | _ThreadReads:
    readers = _LOOP_READS.setdefault(asyncio.get_running_loop(), {})
    if (reader := readers.get(url)) is None:
        engine = get_engine(url)
        if engine.dialect.name == "sqlite":
            reader = _SQLiteReads(engine)
        elif engine.dialect.driver == "psycopg":
            reader = _RawReads(engine, READ_CONNECTIONS)
        else:
            reader = _ThreadReads(engine)
        readers[url] = reader
    return reader


async def close_reads() -> None:
    """Close this event loop's read connections (at the app's shutdown)."""
    for reader in _LOOP_READS.pop(asyncio.get_running_loop(), {}).values():
        await reader.close()


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
