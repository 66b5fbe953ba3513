"""Live job events for `GET …/events?stream=true`: one database poll per followed job, fanned out to all
of its followers in the API's event loop, so a follower holds neither a threadpool thread nor a poll.

Each followed job has a feed: one asyncio task that polls for the job's new events (the query in a worker
thread) and puts each batch, already rendered as SSE frames, on every follower's bounded queue. A follower
that joins, resumes from an older cursor, or lets its queue overflow is "behind": the feed skips it while it
reads what it lacks from the database itself, and it rejoins the live batches before that read, dropping
any frame whose seq it has already sent. So every follower gets every event once, in seq order, and a slow
one never holds up the others.

A tenant holds at most `PHITUNE_MAX_EVENT_STREAMS_PER_TENANT` streams open in a process (`StreamSlots`): each
is a connection, a queue and a coroutine, and without a cap one key could hold them by the thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import to_thread
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.db import session_scope
from app.errors import LimitReached
from app.jobs.schemas import FineTuningJobEvent
from app.repositories import jobs

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15
PAGE = 100  # events per query
QUEUE_BATCHES = 100  # at most one batch a poll: a follower this many behind catches up from the database

KEEPALIVE = b": keep-alive\n\n"
DONE = b"event: done\ndata: {}\n\n"
# The server is shutting down (SIGTERM): the stream ends with this rather than being cut. No data, so that no
# client takes it for `done`'s `{}`; EventSource reconnects after `retry` ms with Last-Event-ID (to another
# replica).
SHUTDOWN = b"retry: 1000\nevent: shutdown\n\n"

Frames = list[tuple[int, bytes]]  # (event seq, SSE frame), in seq order
T = TypeVar("T")


def _sse(event: FineTuningJobEvent) -> bytes:
    data = json.dumps(event.model_dump(mode="json"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


@dataclass
class _Batch:
    frames: Frames
    final: bool  # the job is final and these were its last events


WAKE = _Batch([], final=False)  # wakes a waiting follower to see that the hub is draining


@dataclass(eq=False)
class _Follower:
    queue: asyncio.Queue[_Batch]
    behind: bool = True  # not fed live batches until it has read its backlog


@dataclass(eq=False)
class _Feed:
    job_id: str
    followers: set[_Follower] = field(default_factory=set)
    cursor: int = 0  # the highest seq published (at start, the job's latest seq)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once `cursor` is initialised
    finished: bool = False
    task: asyncio.Task | None = None

    def publish(self, batch: _Batch) -> None:
        self.finished = batch.final
        for follower in self.followers:
            if follower.behind:
                continue
            try:
                follower.queue.put_nowait(batch)
            except asyncio.QueueFull:
                follower.behind = True  # it catches up from the database by seq


class EventHub:
    """The API process's feeds, one per job with at least one follower."""

    def __init__(
        self,
        database_url: str,
        *,
        poll_seconds: float = POLL_SECONDS,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        queue_batches: int = QUEUE_BATCHES,
    ) -> None:
        self.database_url = database_url
        self.poll_seconds = poll_seconds
        self.keepalive_seconds = keepalive_seconds
        self.queue_batches = queue_batches
        self._feeds: dict[str, _Feed] = {}
        self.draining = False

    async def follow(self, job_id: str, after_seq: int) -> AsyncIterator[bytes]:
        """SSE frames of the job's events after `after_seq`, then `event: done` once the job is final and
        all were sent; keep-alive comments while nothing happens. Closing the generator leaves the feed."""
        follower = _Follower(asyncio.Queue(self.queue_batches))
        feed = self._join(job_id, follower)
        sent = after_seq
        try:
            await feed.ready.wait()
            while True:
                if self.draining:
                    yield SHUTDOWN
                    return
                if follower.behind:
                    # Rejoin first: batches published from now on are queued, the database has the rest.
                    follower.behind = False
                    while not follower.queue.empty():
                        follower.queue.get_nowait()
                    # Nothing to read when the follower is as far as the feed, unless the feed has ended.
                    if sent < feed.cursor or feed.finished:
                        while True:
                            frames, final = await to_thread.run_sync(self._read, job_id, sent)
                            if frames:
                                sent = frames[-1][0]
                                yield b"".join(frame for _, frame in frames)
                            if final:
                                yield DONE
                                return
                            if len(frames) < PAGE:
                                break
                    continue
                try:
                    async with asyncio.timeout(self.keepalive_seconds):
                        batch = await follower.queue.get()
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                fresh = [frame for seq, frame in batch.frames if seq > sent]
                if fresh:
                    sent = batch.frames[-1][0]
                    yield b"".join(fresh)
                if batch.final:
                    yield DONE
                    return
        finally:
            self._leave(feed, follower)

    def drain(self) -> None:
        """The server is shutting down: every stream ends with SHUTDOWN at its next turn, a waiting one now
        (on the event loop)."""
        self.draining = True
        for feed in self._feeds.values():
            for follower in feed.followers:
                with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
                    follower.queue.put_nowait(WAKE)

    async def aclose(self) -> None:
        """Stop every poller (at shutdown)."""
        tasks = [feed.task for feed in self._feeds.values() if feed.task]
        self._feeds.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _join(self, job_id: str, follower: _Follower) -> _Feed:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed(job_id)
            feed.task = asyncio.create_task(self._poll(feed), name=f"job-events-{job_id}")
        feed.followers.add(follower)
        return feed

    def _leave(self, feed: _Feed, follower: _Follower) -> None:
        feed.followers.discard(follower)
        if not feed.followers and self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
            if feed.task is not None:
                feed.task.cancel()

    async def _poll(self, feed: _Feed) -> None:
        """Publish the job's new events until it is final and they all were published."""
        try:
            feed.cursor = await self._retrying(self._latest_seq, feed.job_id)
            feed.ready.set()
            while True:
                frames, final = await self._retrying(self._read, feed.job_id, feed.cursor)
                if frames:
                    feed.cursor = frames[-1][0]
                if frames or final:
                    feed.publish(_Batch(frames, final))
                if final:
                    return
                if len(frames) < PAGE:  # a full page means more are waiting
                    await asyncio.sleep(self.poll_seconds)
        finally:
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]

    async def _retrying(self, query: Callable[..., T], *args: Any) -> T:
        """Run a query in a worker thread; a database error is retried at the next poll, since every
        follower of the job waits on this one poller."""
        while True:
            try:
                return await to_thread.run_sync(query, *args)
            except Exception:
                log.exception("polling events of job %s failed; retrying", args[0])
                await asyncio.sleep(self.poll_seconds)

    def _latest_seq(self, job_id: str) -> int:
        with session_scope(self.database_url) as session:
            return jobs.last_event_seq(session, job_id)

    def _read(self, job_id: str, after_seq: int) -> tuple[Frames, bool]:
        """One page of events after `after_seq`, and whether the job is final with none after them."""
        with session_scope(self.database_url) as session:
            # Status first: a job that is final here has all its events committed for the query below.
            status = jobs.status_of(session, job_id)
            events = jobs.events_after(session, job_id, after_seq, limit=PAGE)
            frames = [(event.seq, _sse(FineTuningJobEvent.from_row(event))) for event in events]
        return frames, status is not None and status.is_final and len(frames) < PAGE


class StreamSlots:
    """The live event streams each tenant holds open in this API process, at most `limit` (0: no limit).
    Taken in a threadpool route, given back on the event loop: hence the lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_streams(self, tenant_id: str) -> int:
        return self._open.get(tenant_id, 0)

    def take(self, tenant_id: str) -> Callable[[], None]:
        """A slot of the tenant's, as the function that gives it back (once, however often called); 429
        `too_many_event_streams` when the tenant holds `limit` already."""
        with self._lock:
            held = self._open.get(tenant_id, 0)
            if self.limit and held >= self.limit:
                raise LimitReached(
                    f"This API key's tenant already follows {held} live event streams, the most this server "
                    "allows at once; close one, or read events by page (without stream=true)",
                    param="stream",
                    code="too_many_event_streams",
                )
            self._open[tenant_id] = held + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self._lock:
                if given_back:
                    return
                given_back = True
                if (left := self._open[tenant_id] - 1) > 0:
                    self._open[tenant_id] = left
                else:
                    del self._open[tenant_id]

        return give_back


class SlotStream(StreamingResponse):
    """A streaming response that gives its slot back when it ends, however it ends: the stream finished,
    the client went away (Starlette cancels the response), or sending failed. The route takes the slot last,
    once nothing else can fail before this response is sent."""

    def __init__(self, content: AsyncIterator[bytes], give_back: Callable[[], None], **options: Any) -> None:
        super().__init__(content, **options)
        self._give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._give_back()
