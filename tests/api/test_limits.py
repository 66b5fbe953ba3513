"""Limits per key and per tenant (README "Limits per key and per tenant"), over real HTTP and SQL: a key's
request rate, a tenant's unfinished jobs, stored bytes and live event streams, and a chat request's size.
Each refusal is a 4xx in OpenAI's error shape that leaves no row or file behind; the limits that concurrent
requests race for are raced."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import owner_of_key
from app.config import Settings
from app.db import session_scope
from app.errors import RateLimited
from app.main import create_app
from app.models import Artifact, File, Job
from app.rate_limit import RateLimiter
from tests.api.test_hostile_inputs import assert_error
from tests.api.test_internal import claim
from tests.conftest import make_key
from tests.serving.stub_store import serve_in_thread
from tests.utils import CHAT_LINES, jsonl, upload_file

CHAT = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def limited(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """`limited(**settings)`: a client of an app (an API process) with these settings changed."""
    with ExitStack() as clients:
        yield lambda **changed: clients.enter_context(
            TestClient(create_app(settings.model_copy(update=changed)))
        )


def same_tenant_key(database_url: str, auth: dict[str, str]) -> dict[str, str]:
    """A second key of the tenant that `auth` belongs to."""
    with session_scope(database_url) as session:
        name = owner_of_key(session, auth["Authorization"]).tenant.name
    return {"Authorization": f"Bearer {make_key(database_url, name)}"}


def tenant_rows(database_url: str, model: type, auth: dict[str, str]) -> int:
    """How many rows of `model` (File or Job) the tenant of `auth` has."""
    tenant_id = tenant_of(database_url, auth)
    with session_scope(database_url) as session:
        return session.scalar(select(func.count()).select_from(model).where(model.tenant_id == tenant_id))


def tenant_of(database_url: str, auth: dict[str, str]) -> str:
    with session_scope(database_url) as session:
        return owner_of_key(session, auth["Authorization"]).tenant.id


def stored_files(settings: Settings) -> set[str]:
    """Every file under storage (blobs and temp files alike)."""
    return {str(p) for p in settings.storage_dir.rglob("*") if p.is_file()}


# A key's request rate


def test_a_key_past_its_burst_gets_429_with_retry_after(limited, auth, database_url):
    client = limited(rate_limit_per_minute=1, rate_limit_burst=3)
    assert [client.get("/v1/files", headers=auth).status_code for _ in range(3)] == [200] * 3
    refused = client.get("/v1/files", headers=auth)
    error = assert_error(refused, 429, code="rate_limit_exceeded")
    assert error["type"] == "requests"
    assert "requests per minute: limit 1, burst 3. Try again in 60s." in error["message"]
    assert refused.headers["Retry-After"] == "60"  # one token a minute
    # Another key of the same tenant has a bucket of its own: the limit is per key.
    assert client.get("/v1/files", headers=same_tenant_key(database_url, auth)).status_code == 200


def test_a_refused_key_is_served_again_after_retry_after(limited, auth):
    client = limited(rate_limit_per_minute=60, rate_limit_burst=1)
    assert client.get("/v1/models", headers=auth).status_code == 200
    refused = client.get("/v1/models", headers=auth)
    assert_error(refused, 429, code="rate_limit_exceeded")
    time.sleep(int(refused.headers["Retry-After"]))
    assert client.get("/v1/models", headers=auth).status_code == 200


def test_a_refused_request_changes_nothing_and_a_bad_key_is_401_not_429(limited, auth, database_url):
    client = limited(rate_limit_per_minute=1, rate_limit_burst=2)
    file_id = upload_file(client, auth, CHAT_LINES)
    assert client.get("/v1/files", headers=auth).status_code == 200
    body = {"model": "tiny-phi3", "training_file": file_id}
    assert_error(
        client.post("/v1/fine_tuning/jobs", json=body, headers=auth), 429, code="rate_limit_exceeded"
    )
    assert_error(client.delete(f"/v1/files/{file_id}", headers=auth), 429)
    assert tenant_rows(database_url, Job, auth) == 0
    assert tenant_rows(database_url, File, auth) == 1
    assert_error(client.get("/v1/files", headers={"Authorization": "Bearer pt-forged"}), 401)
    assert_error(client.get("/v1/files"), 401)


def test_concurrent_requests_of_one_key_get_exactly_its_burst(limited, auth):
    """100 requests from 20 threads at once, one key, a bucket of 10 that refills once a minute."""
    client = limited(rate_limit_per_minute=1, rate_limit_burst=10)
    start = threading.Barrier(20)

    def requests(_: int) -> list[int]:
        start.wait()
        return [client.get("/v1/models", headers=auth).status_code for _ in range(5)]

    with ThreadPoolExecutor(20) as pool:
        statuses = [status for batch in pool.map(requests, range(20)) for status in batch]
    assert sorted(statuses) == [200] * 10 + [429] * 90


def test_the_rate_is_per_api_process(limited, auth):
    """Two API processes (apps) on one database: each holds its own buckets, so a key gets each one's burst
    (documented: set the rate to the total wanted divided by the processes)."""
    first, second = (
        limited(rate_limit_per_minute=1, rate_limit_burst=4),
        limited(rate_limit_per_minute=1, rate_limit_burst=4),
    )
    start = threading.Barrier(16)

    def request(index: int) -> tuple[int, int]:
        start.wait()
        client = first if index % 2 else second
        return index % 2, client.get("/v1/models", headers=auth).status_code

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(request, range(16)))
    for process in (0, 1):
        assert sorted(status for p, status in answers if p == process) == [200] * 4 + [429] * 4


def test_a_rate_of_0_is_no_limit(limited, auth):
    client = limited(rate_limit_per_minute=0, rate_limit_burst=1)
    assert {client.get("/v1/models", headers=auth).status_code for _ in range(150)} == {200}


def test_the_buckets_stay_bounded_however_many_keys():
    limiter = RateLimiter(per_minute=1, burst=1)
    limiter.MAX_KEYS = 10
    for n in range(100):
        limiter.take(f"Bearer pt-{n}")
        assert len(limiter._buckets) <= 10
    with pytest.raises(RateLimited):
        limiter.take("Bearer pt-99")  # the newest bucket is kept


# A tenant's unfinished jobs


def create_job(client: TestClient, auth: dict[str, str], file_id: str, **headers: str) -> httpx.Response:
    body = {"model": "tiny-phi3", "training_file": file_id}
    return client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, **headers})


def test_unfinished_jobs_past_the_limit_are_429_until_one_is_final(limited, auth, other_auth, database_url):
    client = limited(max_active_jobs_per_tenant=2)
    file_id = upload_file(client, auth, CHAT_LINES)
    queued = create_job(client, auth, file_id).json()["id"]
    running = create_job(client, auth, file_id).json()["id"]
    _, attempt = claim(client, running)

    error = assert_error(create_job(client, auth, file_id), 429, code="too_many_active_jobs")
    assert error["type"] == "invalid_request_error" and "2 unfinished" in error["message"]
    assert tenant_rows(database_url, Job, auth) == 2
    # Another tenant has its own count.
    assert create_job(client, other_auth, upload_file(client, other_auth, CHAT_LINES)).status_code == 200

    # A running job asked to cancel still counts until its worker has stopped.
    assert client.post(f"/v1/fine_tuning/jobs/{running}/cancel", headers=auth).status_code == 200
    assert_error(create_job(client, auth, file_id), 429, code="too_many_active_jobs")
    completed = client.post(
        f"/internal/v1/jobs/{running}/complete", json={"status": "cancelled"}, headers=attempt
    )
    assert completed.status_code == 200, completed.text
    assert create_job(client, auth, file_id).status_code == 200
    # A queued job cancelled is final at once.
    assert_error(create_job(client, auth, file_id), 429)
    assert client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=auth).json()["status"] == "cancelled"
    assert create_job(client, auth, file_id).status_code == 200
    assert tenant_rows(database_url, Job, auth) == 4


def test_a_retry_with_its_idempotency_key_at_the_limit_gets_its_job(limited, auth):
    client = limited(max_active_jobs_per_tenant=1)
    file_id = upload_file(client, auth, CHAT_LINES)
    first = create_job(client, auth, file_id, **{"Idempotency-Key": "once"})
    again = create_job(client, auth, file_id, **{"Idempotency-Key": "once"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert_error(create_job(client, auth, file_id, **{"Idempotency-Key": "twice"}), 429)


def test_20_concurrent_creates_never_pass_the_limit(limited, auth, database_url):
    """On PostgreSQL the tenant's row lock orders them; on SQLite the database's write lock."""
    client = limited(max_active_jobs_per_tenant=5)
    file_id = upload_file(client, auth, CHAT_LINES)
    start = threading.Barrier(20)

    def create(_: int) -> httpx.Response:
        start.wait()
        return create_job(client, auth, file_id)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(create, range(20)))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 15, [r.text for r in answers]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 429} == {"too_many_active_jobs"}
    assert tenant_rows(database_url, Job, auth) == 5


# A tenant's stored bytes


def post_file(client: TestClient, auth: dict[str, str], content: bytes) -> httpx.Response:
    files = {"file": ("train.jsonl", content, "application/jsonl")}
    return client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=auth)


def test_an_upload_past_the_tenants_storage_is_413_and_leaves_nothing(limited, auth, settings, database_url):
    dataset = jsonl(CHAT_LINES)
    client = limited(max_stored_bytes_per_tenant=2 * len(dataset) + 10)
    kept = [post_file(client, auth, dataset).json()["id"] for _ in range(2)]
    before = stored_files(settings)

    error = assert_error(post_file(client, auth, dataset), 413, param="file", code="storage_limit_exceeded")
    assert error["type"] == "invalid_request_error"
    assert f"{2 * len(dataset)} in use" in error["message"]
    assert stored_files(settings) == before  # neither the blob nor its temp file
    assert tenant_rows(database_url, File, auth) == 2

    assert client.delete(f"/v1/files/{kept[0]}", headers=auth).status_code == 200
    assert post_file(client, auth, dataset).status_code == 200


def test_adapter_archives_count_towards_storage(limited, auth, database_url):
    dataset = jsonl(CHAT_LINES)
    client = limited(max_stored_bytes_per_tenant=3 * len(dataset))
    job_id = create_job(client, auth, upload_file(client, auth, CHAT_LINES)).json()["id"]
    assert post_file(client, auth, dataset).status_code == 200  # two of three
    with session_scope(database_url) as session:
        session.add(
            Artifact(job_id=job_id, scope="final", format="peft", storage_key="x", sha256="0" * 64, bytes=10)
        )
    assert_error(post_file(client, auth, dataset), 413, code="storage_limit_exceeded")


def test_concurrent_uploads_never_pass_the_storage_limit(limited, auth, settings, database_url):
    dataset = jsonl(CHAT_LINES)
    client = limited(max_stored_bytes_per_tenant=3 * len(dataset))
    start = threading.Barrier(10)

    def upload(_: int) -> httpx.Response:
        start.wait()
        return post_file(client, auth, dataset)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(upload, range(10)))
    assert sorted(r.status_code for r in answers) == [200] * 3 + [413] * 7, [r.text for r in answers]
    assert tenant_rows(database_url, File, auth) == 3
    assert len(stored_files(settings)) == 3  # the three blobs, no temp file


# Live event streams


def test_event_streams_past_the_tenants_limit_are_429_and_a_closed_one_frees_its_slot(
    settings, client, auth, other_auth, job_id
):
    """Over real HTTP (uvicorn): two streams held open, the third refused; a client that disconnects gives
    its slot back."""
    app = create_app(settings.model_copy(update={"max_event_streams_per_tenant": 2}))
    slots = app.state.stream_slots
    tenant_id = tenant_of(settings.resolved_database_url, auth)
    other_job = create_job(client, other_auth, upload_file(client, other_auth, CHAT_LINES)).json()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    with serve_in_thread(app) as base_url, ExitStack() as open_streams:
        http = open_streams.enter_context(httpx.Client(base_url=base_url, timeout=10))
        readers = []  # dropping a stream's iterator would close it

        def follow(headers: dict[str, str], path: str = url) -> httpx.Response:
            """A stream, held open with its first frame read when it was accepted."""
            stream = open_streams.enter_context(
                http.stream("GET", path, params={"stream": "true"}, headers=headers)
            )
            if stream.status_code == 200:
                readers.append(chunks := stream.iter_bytes())
                assert b"Created fine-tuning job" in next(chunks)
            return stream

        held = [follow(auth), follow(auth)]
        assert [stream.status_code for stream in held] == [200, 200]
        assert slots.open_streams(tenant_id) == 2

        refused = http.get(url, params={"stream": "true"}, headers=auth)
        assert_error(refused, 429, param="stream", code="too_many_event_streams")
        by_header = http.get(url, headers={**auth, "Accept": "text/event-stream"})
        assert_error(by_header, 429, code="too_many_event_streams")
        # Paged reads are not streams; another tenant has slots of its own.
        assert http.get(url, headers=auth).status_code == 200
        assert follow(other_auth, f"/v1/fine_tuning/jobs/{other_job}/events").status_code == 200

        held[0].close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while (stream := follow(auth)).status_code == 429:
            stream.read()
            assert time.monotonic() < deadline, "the closed stream's slot was never given back"
            time.sleep(0.05)
        assert stream.status_code == 200
        assert slots.open_streams(tenant_id) == 2

        open_streams.close()  # every client goes away
        while slots.open_streams(tenant_id):
            assert time.monotonic() < deadline + 10, "slots of closed streams were kept"
            time.sleep(0.05)


def test_a_stream_refused_for_a_bad_cursor_takes_no_slot(limited, auth, job_id, database_url):
    client = limited(max_event_streams_per_tenant=1)
    for _ in range(3):
        response = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events?stream=true&after=ftevent-x", headers=auth
        )
        assert_error(response, 400, code="invalid_cursor")
    assert client.app.state.stream_slots.open_streams(tenant_of(database_url, auth)) == 0


# Chat request size


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "x" * 101}],
        [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "x" * 41}],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x" * 50}, {"type": "text", "text": "x" * 51}],
            }
        ],
    ],
)
def test_a_prompt_past_the_character_cap_is_400_before_the_inference_server(limited, auth, messages):
    client = limited(max_prompt_chars=100)
    response = client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=auth)
    error = assert_error(response, 400, param="messages", code="context_length_exceeded")
    assert "101 characters" in error["message"]


def test_a_prompt_at_the_cap_and_max_tokens_at_the_setting_reach_the_inference_server(limited, auth):
    """Nothing listens at the tests' inference URL: a request that passed every check is a 503."""
    client = limited(max_prompt_chars=100, max_completion_tokens=50)
    at_cap = {**CHAT, "messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 50}
    assert_error(client.post("/v1/chat/completions", json=at_cap, headers=auth), 503)
    for field in ("max_tokens", "max_completion_tokens"):
        response = client.post("/v1/chat/completions", json={**CHAT, field: 51}, headers=auth)
        assert "50 this server generates" in assert_error(response, 400, param=field)["message"]


def test_limit_settings_refuse_nonsense():
    for bad in ({"rate_limit_per_minute": -1}, {"rate_limit_burst": 0}, {"max_completion_tokens": 131_073}):
        with pytest.raises(ValueError):
            Settings(**bad)
