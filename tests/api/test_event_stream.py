"""The live event stream's shared fan-out, and cancellation under concurrent requests, on real databases."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.jobs.event_stream import DONE, KEEPALIVE, EventHub
from app.jobs.service import add_event, finish_job
from app.models import Job, JobEvent, JobStatus
from tests.api.test_internal import claim


def all_event_ids(client, auth, job_id: str) -> list[str]:
    page = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, "order": "asc"}, headers=auth
    ).json()
    assert not page["has_more"]
    return [event["id"] for event in page["data"]]


def streamed_ids(body: str) -> list[str]:
    return [json.loads(line[6:])["id"] for line in body.splitlines() if line.startswith('data: {"')]


def test_followers_from_different_cursors_each_get_every_event_once_then_done(client, auth, job_id):
    _, attempt = claim(client, job_id)

    def post(step: int) -> None:
        body = {"events": [{"type": "metrics", "message": f"Step {step}", "data": {"step": step}}]}
        response = client.post(f"/internal/v1/jobs/{job_id}/events", json=body, headers=attempt)
        assert response.status_code == 200

    for step in range(5):
        post(step)
    before = all_event_ids(client, auth, job_id)
    bodies: dict[str, str] = {}

    def follow(name: str, headers: dict[str, str], params: dict[str, str]) -> None:
        response = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events",
            params={"stream": "true", **params},
            headers={**auth, **headers},
        )
        assert response.status_code == 200
        bodies[name] = response.text

    # Cursors older than the feed's, from the start, from the middle, from the last event, by header;
    # some join before the live events, some while they arrive (the hub polls every 0.5 s).
    followers = {
        "start": ({}, {}, None),
        "after-first": ({}, {"after": before[0]}, before[0]),
        "last-event-id": ({"Last-Event-ID": before[2]}, {}, before[2]),
        "at-head": ({}, {"after": before[-1]}, before[-1]),
    }
    threads = {
        name: threading.Thread(target=follow, args=(name, headers, params))
        for name, (headers, params, _) in followers.items()
    }
    late = {"late-start": ({}, {}, None), "late-after-first": ({}, {"after": before[1]}, before[1])}
    for thread in threads.values():
        thread.start()
    for step in range(5, 25):
        post(step)
        time.sleep(0.05)
        if step == 15:
            for name, (headers, params, _) in late.items():
                threads[name] = threading.Thread(target=follow, args=(name, headers, params))
                threads[name].start()
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["cancel_requested"]
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "cancelled"}, headers=attempt)
    for thread in threads.values():
        thread.join(timeout=30)
        assert not thread.is_alive(), "a follower did not see the job end"

    every = all_event_ids(client, auth, job_id)
    assert len(every) == len(before) + 20 + 2  # the cancellation request and the final event
    for name, (_, _, cursor) in {**followers, **late}.items():
        expected = every[every.index(cursor) + 1 :] if cursor else every
        assert streamed_ids(bodies[name]) == expected, name
        assert bodies[name].endswith(DONE.decode()), name


@pytest.mark.parametrize("running", [True, False], ids=["running", "queued"])
def test_concurrent_cancels_write_one_event_and_all_succeed(client, auth, job_id, running):
    if running:
        claim(client, job_id)
    start = threading.Barrier(10)

    def cancel(_: int):
        start.wait()
        return client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(cancel, range(10)))
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    assert all(r.json()["cancel_requested"] for r in responses)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}, headers=auth).json()
    messages = [event["message"] for event in events["data"]]
    expected = "Cancellation requested" if running else "Job cancelled before it started"
    assert sum(message.startswith(expected) for message in messages) == 1, messages
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == ("running" if running else "cancelled")


def add_events(database_url: str, job_id: str, count: int, *, final: bool = False) -> None:
    with session_scope(database_url) as session:
        for index in range(count):
            add_event(session, job_id, f"event {index}")
        if final:
            job = session.scalar(select(Job).where(Job.id == job_id))
            finish_job(session, job, JobStatus.CANCELLED, "Job cancelled")


def test_a_slow_follower_catches_up_from_the_database_without_holding_up_the_others(
    client, job_id, database_url
):
    claim(client, job_id)
    # One batch per queue: a follower that does not read at once overflows it at the next poll.
    hub = EventHub(database_url, poll_seconds=0.02, queue_batches=1)

    async def read(delay: float) -> tuple[bytes, float]:
        """The whole stream, read with a pause after each chunk, and when its end arrived."""
        chunks = []
        async for chunk in hub.follow(job_id, 0):
            chunks.append(chunk)
            if chunk == DONE:
                return b"".join(chunks), time.monotonic()
            await asyncio.sleep(delay)
        raise AssertionError("the stream ended without event: done")

    async def scenario():
        fast, slow = asyncio.create_task(read(0)), asyncio.create_task(read(1))
        for _ in range(20):
            await asyncio.to_thread(add_events, database_url, job_id, 3)
            await asyncio.sleep(0.03)
        await asyncio.to_thread(add_events, database_url, job_id, 1, final=True)
        final_at = time.monotonic()
        return await asyncio.wait_for(asyncio.gather(fast, slow), 30), final_at

    ((fast_body, fast_end), (slow_body, slow_end)), final_at = asyncio.run(scenario())
    with session_scope(database_url) as session:
        expected = list(
            session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        )
    assert streamed_ids(fast_body.decode()) == expected
    assert streamed_ids(slow_body.decode()) == expected
    # The slow follower pauses 1 s after each chunk: the fast one ends well before it, without waiting.
    assert fast_end - final_at < 0.9 and fast_end < slow_end
    assert not hub._feeds


def test_an_idle_stream_keeps_alive_and_a_follower_that_leaves_stops_its_jobs_poll(
    client, job_id, database_url
):
    hub = EventHub(database_url, poll_seconds=0.02, keepalive_seconds=0.1)

    async def scenario() -> None:
        stream = hub.follow(job_id, 0)
        assert b"Created fine-tuning job" in await stream.__anext__()
        assert await stream.__anext__() == KEEPALIVE  # the queued job says nothing more
        poller = hub._feeds[job_id].task
        await stream.aclose()  # what Starlette does when the client disconnects
        assert not hub._feeds
        await asyncio.sleep(0.05)
        assert poller.cancelled()

    asyncio.run(scenario())
