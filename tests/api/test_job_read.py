"""GET /v1/fine_tuning/jobs/{id}, the route pollers call: the job read outside a unit of work (app.db.read; on
PostgreSQL on psycopg's own asyncio connections), answered as the response model would answer it, and never
stale: a write acknowledged by one API process is what the next GET on another process answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, OperationalError

from app import db
from app.config import Settings
from app.db import get_engine, session_scope
from app.deps import CurrentTenant, TenantRoute
from app.main import create_app
from app.models import Job
from app.repositories import jobs
from phitune.launch import free_port, running
from tests.conftest import make_key

JOBS = "/v1/fine_tuning/jobs"


def upload(client: TestClient, auth: dict[str, str]) -> str:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    files = {"file": ("train.jsonl", (json.dumps(row) + "\n").encode())}
    response = client.post("/v1/files", headers=auth, files=files, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client: TestClient, auth: dict[str, str]) -> dict:
    body = {"model": "tiny-phi3", "training_file": upload(client, auth), "metadata": {"team": "search"}}
    response = client.post(JOBS, headers=auth, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def enrich(database_url: str, job_id: str) -> None:
    """Give the row what a running job has: progress, an error object, flags set (JSON, booleans, nulls)."""
    values = {
        "progress": {"step": 3, "total_steps": 10, "train_loss": 1.25},
        "error": {"code": "oom", "message": "Out of memory", "param": None},
        "cancel_requested": True,
        "trained_tokens": 1234,
        "started_at": 1_700_000_000,
    }
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(values))


@pytest.fixture
def tenant_auth(database_url: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(database_url)}"}


def test_get_answers_the_job_as_the_response_model_would(client: TestClient, tenant_auth) -> None:
    created = create_job(client, tenant_auth)
    got = client.get(f"{JOBS}/{created['id']}", headers=tenant_auth)
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert got.json() == created  # the create route's answer goes through FastAPI's response model
    listed = client.get(JOBS, headers=tenant_auth).json()["data"]
    assert listed == [got.json()]


def test_get_of_another_tenants_job_or_an_unknown_one_is_404(client, tenant_auth, other_auth) -> None:
    job = create_job(client, tenant_auth)
    for path, auth in ((f"{JOBS}/{job['id']}", other_auth), (f"{JOBS}/ftjob-nope", tenant_auth)):
        response = client.get(path, headers=auth)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    assert client.get(f"{JOBS}/{job['id']}").status_code == 401


def test_an_id_no_database_can_hold_is_404_not_500(client: TestClient, tenant_auth) -> None:
    # On PostgreSQL a NUL in the id fails in the driver: its error is SQLAlchemy's DataError, answered 404.
    response = client.get(f"{JOBS}/ftjob-%00x", headers=tenant_auth)
    assert response.status_code == 404, response.text


def test_each_change_of_the_row_is_answered_and_only_a_change_makes_a_new_body(
    client: TestClient, tenant_auth, database_url
) -> None:
    # On SQLite an unchanged row is read as the same object, its body made once (app.db, app.jobs.routes).
    job = create_job(client, tenant_auth)
    url = f"{JOBS}/{job['id']}"
    assert client.get(url, headers=tenant_auth).json() == job
    enrich(database_url, job["id"])
    changed = client.get(url, headers=tenant_auth).json()
    assert changed["progress"]["step"] == 3 and changed["cancel_requested"] is True
    with session_scope(database_url) as session:
        as_made = {"progress": None, "error": None, "cancel_requested": False, "trained_tokens": None}
        session.execute(update(Job).where(Job.id == job["id"]).values({**as_made, "started_at": None}))
    assert client.get(url, headers=tenant_auth).json() == job  # back as it was: the first body again
    assert client.get(url, headers=tenant_auth).json() == job


def test_the_route_checks_the_key_and_its_rate_as_the_dependency_would(
    settings: Settings, tenant_auth
) -> None:
    # TenantRoute calls get_job without FastAPI's dependency solving: the same answers, in the same shape.
    with TestClient(
        create_app(settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 2}))
    ) as client:
        job_id = create_job(client, tenant_auth)["id"]  # the upload and the create take the burst's 2 tokens
        refused = [
            ({}, 401, "missing_api_key"),
            ({"Authorization": "Basic x"}, 401, "invalid_api_key"),
            ({"Authorization": "Bearer pt-unknown"}, 401, "invalid_api_key"),
            (tenant_auth, 429, "rate_limit_exceeded"),
        ]
        for headers, status, code in refused:
            response = client.get(f"{JOBS}/{job_id}", headers=headers)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["code"] == code and set(error) == {"message", "type", "param", "code"}


def test_a_tenant_route_refuses_an_endpoint_it_cannot_call() -> None:
    async def takes_a_query(fine_tuning_job_id: str, request: Request, tenant: CurrentTenant, limit: int = 1):
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="a TenantRoute's endpoint takes"):
        APIRouter().add_api_route("/{fine_tuning_job_id}", takes_a_query, route_class_override=TenantRoute)


def test_the_read_gives_the_row_sqlalchemy_gives(client: TestClient, tenant_auth, database_url) -> None:
    job = create_job(client, tenant_auth)
    enrich(database_url, job["id"])
    tenant_id = job["organization_id"]
    with get_engine(database_url).connect() as connection:
        expected = jobs.record_for_tenant(connection, tenant_id, job["id"])._asdict()

    async def read(times: int) -> list[dict]:
        try:  # after the first, reads run on a kept connection, and from the fifth on a prepared statement
            return [
                (await db.read(database_url, jobs.record_for_tenant, tenant_id, job["id"]))._asdict()
                for _ in range(times)
            ]
        finally:
            await db.close_reads()

    assert asyncio.run(read(6)) == [expected] * 6
    assert expected["progress"]["train_loss"] == 1.25 and expected["cancel_requested"] is True


def test_a_read_connection_the_server_dropped_is_replaced(settings: Settings, tenant_auth) -> None:
    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL: a server that drops connections")
    with TestClient(create_app(settings)) as client:
        job = create_job(client, tenant_auth)
        for _ in range(3):  # the read connections are open and kept
            assert client.get(f"{JOBS}/{job['id']}", headers=tenant_auth).status_code == 200
        admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            dropped = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        admin.dispose()
        assert dropped >= 1
        got = client.get(f"{JOBS}/{job['id']}", headers=tenant_auth)
        assert got.status_code == 200, got.text
        assert got.json()["id"] == job["id"]


@pytest.fixture
def two_api_processes(database_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two `phitune api` processes on one database, each with its own read connections."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(tmp_path / "data"),
        "PHITUNE_DATABASE_URL": database_url,
        "HF_HUB_OFFLINE": "1",
    }
    urls = []
    with ExitStack() as stack:
        for _ in range(2):
            url = f"http://127.0.0.1:{free_port()}"
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            stack.enter_context(running(["api", "--port", url.rsplit(":", 1)[1]], url, env=env, **quiet))
            urls.append(url)
        yield urls[0], urls[1]


def test_a_write_acknowledged_by_one_process_is_what_the_next_get_on_another_answers(
    two_api_processes: tuple[str, str], tenant_auth
) -> None:
    first, second = two_api_processes
    with (
        httpx.Client(base_url=first, headers=tenant_auth) as a,
        httpx.Client(base_url=second, headers=tenant_auth) as b,
    ):
        row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        uploaded = a.post(
            "/v1/files",
            files={"file": ("train.jsonl", (json.dumps(row) + "\n").encode())},
            data={"purpose": "fine-tune"},
        ).json()
        job = a.post(JOBS, json={"model": "tiny-phi3", "training_file": uploaded["id"]}).json()
        path = f"{JOBS}/{job['id']}"
        for _ in range(10):  # `second` polls: its read connection is kept, its statement prepared
            assert b.get(path).json()["status"] == "queued"
        assert a.post(f"{path}/cancel").json()["status"] == "cancelled"
        assert b.get(path).json()["status"] == "cancelled"
        assert a.get(path).json() == b.get(path).json()


def test_an_unchanged_row_is_read_as_the_same_object_and_a_changed_one_anew(
    client: TestClient, tenant_auth, database_url
) -> None:
    # The route makes an unchanged job's body once (app.jobs.routes keeps it by the row's identity).
    job = create_job(client, tenant_auth)
    key = (job["organization_id"], job["id"])

    async def reads() -> list:
        try:
            first = [await db.read(database_url, jobs.record_for_tenant, *key) for _ in range(7)]
            enrich(database_url, job["id"])
            return [*first, await db.read(database_url, jobs.record_for_tenant, *key)]
        finally:
            await db.close_reads()

    rows = asyncio.run(reads())
    assert all(row is rows[0] for row in rows[:7])
    assert rows[7] is not rows[0] and rows[7].progress["step"] == 3 and rows[0].progress is None


def postgres_reader(database_url: str) -> db._RawReads:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL: reads of one row share a round trip there")
    return db._RawReads(get_engine(database_url), db.READ_CONNECTIONS)


def held(reader: db._RawReads, release: asyncio.Event, *, first_only: bool = False) -> list[dict]:
    """Make `reader`'s round trips (only its first if `first_only`) wait for `release` before they start;
    the parameters of each round trip are listed in the list returned."""
    fetch, round_trips = reader._fetch, []

    async def held_fetch(sql: str, params: dict, *, many: bool):
        round_trips.append(params)
        if len(round_trips) == 1 or not first_only:
            await release.wait()
        return await fetch(sql, params, many=many)

    reader._fetch = held_fetch  # type: ignore[method-assign]
    return round_trips


def reader_of_a_job(client: TestClient, auth: dict[str, str], database_url: str) -> tuple:
    """A PostgreSQL reader, a new job and the job's key (tenant id, job id)."""
    reader = postgres_reader(database_url)
    job = create_job(client, auth)
    return reader, job, (job["organization_id"], job["id"])


def test_concurrent_reads_share_round_trips_each_answered_with_its_own_row(
    client: TestClient, tenant_auth, other_auth, database_url
) -> None:
    reader = postgres_reader(database_url)
    mine = [create_job(client, tenant_auth) for _ in range(3)]
    theirs = create_job(client, other_auth)
    round_trips = []
    fetch = reader._fetch

    async def counted(sql: str, params: dict, *, many: bool):
        round_trips.append(params)
        return await fetch(sql, params, many=many)

    reader._fetch = counted  # type: ignore[method-assign]
    tenant = mine[0]["organization_id"]
    asked = [
        *((tenant, job["id"]) for job in mine * 20),
        (tenant, theirs["id"]),  # another tenant's job: none
        (tenant, "ftjob-missing"),
        (tenant, mine[0]["id"] + " "),  # no row: an id is matched exactly
        (tenant, "ftjob-\x00"),  # an id no database can hold: an error for this read alone
    ]

    async def poll(keys: list[tuple[str, str]]) -> list:
        try:
            reads = [reader.fetch_one(jobs.record_for_tenant, key) for key in keys]
            return await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await reader.close()

    *rows, theirs_row, missing, blank = asyncio.run(poll(asked[:-1]))
    assert [row.id for row in rows] == [job["id"] for job in mine * 20]
    assert all(row is rows[i % 3] for i, row in enumerate(rows))  # an unchanged row is one object
    assert theirs_row is None and missing is None and blank is None
    # The first read's own round trip, then one for the 62 that arrived while it was in flight, asking once
    # for each of the 6 rows they want.
    distinct = list(dict.fromkeys(asked[1:]))
    assert len(round_trips) == 2
    assert round_trips[1] == {"tenant_id": [tenant] * 6, "job_id": [key[1] for key in distinct[:-1]]}

    round_trips.clear()
    *again, nul, surrogate = asyncio.run(poll([*asked, (tenant, "ftjob-\ud800")]))
    assert [row and row.id for row in again] == [row and row.id for row in [*rows, None, None, None]]
    assert isinstance(nul, DataError) and isinstance(surrogate, UnicodeEncodeError)
    # Ids psycopg refuses are read alone, failing only their own reads: the first read, the two bad ones,
    # and one round trip shared by the rest.
    assert len(round_trips) == 1 + 2 + 1


def test_with_the_database_down_a_shared_round_trip_fails_every_read_once() -> None:
    reader = db._RawReads(get_engine("postgresql+psycopg://postgres@127.0.0.1:1/test"), db.READ_CONNECTIONS)
    attempts = []
    open_connection = reader._open

    async def counted():
        attempts.append(1)
        return await open_connection()

    reader._open = counted  # type: ignore[method-assign]

    async def poll() -> list:
        try:
            reads = [reader.fetch_one(jobs.record_for_tenant, ("t", f"ftjob-{i}")) for i in range(30)]
            return await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await reader.close()

    answers = asyncio.run(poll())
    assert all(isinstance(answer, OperationalError) for answer in answers)
    assert len(attempts) == 2  # the first read's, and the one the other 29 shared


def test_a_read_arriving_while_the_next_round_trip_waits_is_answered_by_it(
    client: TestClient, tenant_auth, database_url
) -> None:
    reader, job, key = reader_of_a_job(client, tenant_auth, database_url)
    release = asyncio.Event()
    round_trips = held(reader, release, first_only=True)

    async def race() -> list:
        try:
            first = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key))
            await asyncio.sleep(0.01)  # the next round trip now waits for the first
            third = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, (key[0], "ftjob-none")))
            await asyncio.sleep(0.01)
            release.set()
            return await asyncio.gather(first, second, third)
        finally:
            await reader.close()

    first, second, third = asyncio.run(race())
    assert first.id == second.id == job["id"] and third is None
    assert len(round_trips) == 2


def test_a_read_never_shares_a_round_trip_that_began_before_it(
    client: TestClient, tenant_auth, database_url
) -> None:
    # A write acknowledged while a read of the row is in flight: a read asked for after the write waits for a
    # round trip of its own, even though the one in flight reads the same row.
    reader, job, key = reader_of_a_job(client, tenant_auth, database_url)
    answered, release = asyncio.Event(), asyncio.Event()
    fetch = reader._fetch

    async def slow_answer(sql: str, params: dict, *, many: bool):
        raw = await fetch(sql, params, many=many)  # the row as the database holds it now ...
        answered.set()
        await release.wait()  # ... reaches the caller late
        return raw

    reader._fetch = slow_answer  # type: ignore[method-assign]

    async def race() -> tuple:
        try:
            before = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key))
            await answered.wait()
            await asyncio.to_thread(enrich, database_url, job["id"])  # committed
            after = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key))
            late = asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key))
            await asyncio.sleep(0.05)
            release.set()
            return await before, await after, await late
        finally:
            await reader.close()

    before, after, late = asyncio.run(race())
    assert before.progress is None
    assert after.progress["step"] == 3 and late is after


def test_a_caller_that_goes_away_leaves_the_shared_read_to_the_others(
    client: TestClient, tenant_auth, database_url
) -> None:
    reader, job, key = reader_of_a_job(client, tenant_auth, database_url)
    release = asyncio.Event()
    held(reader, release)

    async def leave() -> list:
        try:
            callers = [asyncio.ensure_future(reader.fetch_one(jobs.record_for_tenant, key)) for _ in range(3)]
            await asyncio.sleep(0.01)
            callers[0].cancel()
            callers[1].cancel()  # the first caller of the second round trip, which the third shares
            release.set()
            return await asyncio.gather(*callers, return_exceptions=True)
        finally:
            await reader.close()

    first, second, third = asyncio.run(leave())
    assert isinstance(first, asyncio.CancelledError) and isinstance(second, asyncio.CancelledError)
    assert third.id == job["id"]
