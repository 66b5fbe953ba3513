"""Idempotency-Key on the POSTs that create things: a retry returns the first object and creates nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.api.test_jobs import assert_error
from tests.utils import CHAT_LINES, jsonl, upload_file


def post_file(client, auth, records, key):
    return client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(records), "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers={**auth, "Idempotency-Key": key},
    )


def test_retried_job_creation_returns_the_same_job(client, auth, other_auth):
    file_id = upload_file(client, auth, CHAT_LINES)
    body = {"model": "tiny-phi3", "training_file": file_id, "suffix": "x"}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, "Idempotency-Key": "k1"})
    again = client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 1

    changed = client.post(
        "/v1/fine_tuning/jobs", json={**body, "suffix": "y"}, headers={**auth, "Idempotency-Key": "k1"}
    )
    assert_error(changed, 422, param="Idempotency-Key", code="idempotency_key_reused")
    fresh = client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, "Idempotency-Key": "k2"})
    assert fresh.json()["id"] != first.json()["id"]
    # Keys belong to a tenant: another tenant's identical key is a different request.
    other_file = upload_file(client, other_auth, CHAT_LINES)
    other = client.post(
        "/v1/fine_tuning/jobs",
        json={**body, "training_file": other_file},
        headers={**other_auth, "Idempotency-Key": "k1"},
    )
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]


def test_retried_upload_returns_the_same_file_and_stores_one_blob(client, auth, settings):
    first = post_file(client, auth, CHAT_LINES, "upload-1")
    again = post_file(client, auth, CHAT_LINES, "upload-1")
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/files", headers=auth).json()["data"]) == 1
    blobs = [p for p in settings.storage_dir.rglob("*") if p.is_file()]
    assert len(blobs) == 1
    changed = post_file(client, auth, CHAT_LINES[:2], "upload-1")
    assert_error(changed, 422, code="idempotency_key_reused")
    assert [p for p in settings.storage_dir.rglob("*") if p.is_file()] == blobs


def test_overlong_key_is_400(client, auth):
    assert_error(post_file(client, auth, CHAT_LINES, "k" * 256), 400, param="Idempotency-Key")


def test_concurrent_duplicates_create_one_job_and_one_file(client, auth, settings):
    """20 copies of a request with one key, sent at once: one object, the same answer to all of them. On
    PostgreSQL the losers' inserts of the key fail once the winner commits (app.idempotency.create_once)."""
    file_id = upload_file(client, auth, CHAT_LINES)
    body = {"model": "tiny-phi3", "training_file": file_id}
    start = threading.Barrier(20)

    def create_job(_: int):
        start.wait()
        return client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, "Idempotency-Key": "twins"})

    with ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(create_job, range(20)))
    assert {response.status_code for response in jobs} == {200}, [
        r.text for r in jobs if r.status_code != 200
    ]
    assert len({response.json()["id"] for response in jobs}) == 1
    assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 1

    blobs_before = {p for p in settings.storage_dir.rglob("*") if p.is_file()}

    def upload(_: int):
        start.wait()
        return post_file(client, auth, CHAT_LINES[:3], "file-twins")

    with ThreadPoolExecutor(20) as pool:
        files = list(pool.map(upload, range(20)))
    assert {response.status_code for response in files} == {200}, [
        r.text for r in files if r.status_code != 200
    ]
    assert len({response.json()["id"] for response in files}) == 1
    assert len(client.get("/v1/files", headers=auth).json()["data"]) == 2
    # The losers' blobs are gone: one new blob, no temp file left.
    assert len({p for p in settings.storage_dir.rglob("*") if p.is_file()} - blobs_before) == 1
