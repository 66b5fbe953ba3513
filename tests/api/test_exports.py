"""Merged-model exports on a real database: requested by a tenant, made through the worker routes as a real
worker makes one, downloaded; retried when its worker is lost; gone with a deleted model."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_scope
from app.jobs.leases import MAX_ATTEMPTS
from app.main import create_app
from app.models import Job
from app.models.tables import Export
from app.repositories.files import stored_bytes
from tests.api.test_internal import WORKER, succeeded_job, tiny_archive

JOBS = "/v1/fine_tuning/jobs"
MERGED_TAR = b"a merged model's tar" * 1000


@pytest.fixture
def job(client, auth) -> str:
    return succeeded_job(client, auth)


def request(client, auth, job_id: str):
    return client.post(f"{JOBS}/{job_id}/exports", json={"format": "merged"}, headers=auth)


def claim(client, export_id: str) -> dict[str, str]:
    response = client.post(f"/internal/v1/exports/{export_id}/claim", headers=WORKER)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def upload(client, export_id: str, attempt: dict[str, str], content: bytes = MERGED_TAR, sha256=None):
    digest = sha256 or hashlib.sha256(content).hexdigest()
    path = f"/internal/v1/exports/{export_id}/content"
    return client.put(path, params={"sha256": digest}, content=content, headers=attempt)


def expire_lease(database_url: str, export_id: str) -> None:
    with session_scope(database_url) as session:
        session.execute(update(Export).where(Export.id == export_id).values(lease_expires_at=0))


def test_export_is_made_by_a_worker_and_downloaded(client, auth, job) -> None:
    created = request(client, auth, job)
    assert created.status_code == 202, created.text
    export = created.json()
    assert export["object"] == "fine_tuning.job.export" and export["status"] == "queued"
    assert export["job_id"] == job and export["format"] == "merged" and export["bytes"] is None
    # Idempotent: a second request, and the GET spelling, answer with the same export.
    assert request(client, auth, job).json()["id"] == export["id"]
    assert client.get(f"{JOBS}/{job}/merged", headers=auth).json()["id"] == export["id"]
    early = client.get(f"{JOBS}/{job}/exports/{export['id']}/content", headers=auth)
    assert early.status_code == 409 and early.json()["error"]["code"] == "export_not_ready"

    attempt = claim(client, export["id"])
    assert client.post(f"/internal/v1/exports/{export['id']}/claim", headers=WORKER).status_code == 409
    adapter = client.get(f"/internal/v1/exports/{export['id']}/adapter", headers=attempt)
    assert adapter.content == tiny_archive() and adapter.headers["x-phitune-adapter-format"] == "peft"
    assert client.get(f"/internal/v1/exports/{export['id']}/adapter", headers=WORKER).status_code == 401
    assert client.post(f"/internal/v1/exports/{export['id']}/heartbeat", headers=attempt).status_code == 200
    running = client.get(f"{JOBS}/{job}/exports/{export['id']}", headers=auth).json()
    assert running["status"] == "running"

    damaged = upload(client, export["id"], attempt, sha256="0" * 64)
    assert damaged.status_code == 400 and damaged.json()["error"]["param"] == "sha256"
    assert upload(client, export["id"], attempt).json()["bytes"] == len(MERGED_TAR)
    done = client.get(f"{JOBS}/{job}/exports/{export['id']}", headers=auth).json()
    assert done["status"] == "succeeded" and done["bytes"] == len(MERGED_TAR) and done["finished_at"]
    assert client.get(f"{JOBS}/{job}/merged", headers=auth).status_code == 200

    content = client.get(f"{JOBS}/{job}/exports/{export['id']}/content", headers=auth)
    assert content.status_code == 200 and content.content == MERGED_TAR
    assert content.headers["content-type"] == "application/x-tar"
    assert content.headers["etag"] == f'"{hashlib.sha256(MERGED_TAR).hexdigest()}"'
    assert ".merged.tar" in content.headers["content-disposition"]
    part = client.get(
        f"{JOBS}/{job}/exports/{export['id']}/content", headers={**auth, "Range": "bytes=10-19"}
    )
    assert part.status_code == 206 and part.content == MERGED_TAR[10:20]
    listed = client.get(f"{JOBS}/{job}/exports", headers=auth).json()
    assert [item["id"] for item in listed["data"]] == [export["id"]] and listed["has_more"] is False
    # The attempt is over: its token uploads nothing more.
    assert upload(client, export["id"], attempt).status_code == 409


def test_only_a_succeeded_job_of_ones_own_is_exported(client, auth, other_auth, job, job_id) -> None:
    queued = request(client, auth, job_id)
    assert queued.status_code == 409 and queued.json()["error"]["code"] == "job_not_succeeded"
    assert request(client, other_auth, job).status_code == 404
    assert client.get(f"{JOBS}/{job}/merged", headers=other_auth).status_code == 404
    assert request(client, auth, "ftjob-missing").status_code == 404
    bad = client.post(f"{JOBS}/{job}/exports", json={"format": "gguf"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
    export_id = request(client, auth, job).json()["id"]
    assert client.get(f"{JOBS}/{job}/exports/{export_id}", headers=other_auth).status_code == 404
    assert client.get(f"{JOBS}/{job}/exports/{export_id}/content", headers=other_auth).status_code == 404
    missing = client.get(f"{JOBS}/{job}/exports/ftexp-missing", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "export_not_found"


def test_failed_export_says_why_and_a_new_request_starts_again(client, auth, job) -> None:
    export_id = request(client, auth, job).json()["id"]
    attempt = claim(client, export_id)
    failed = client.post(
        f"/internal/v1/exports/{export_id}/fail", json={"message": "out of disk"}, headers=attempt
    )
    assert failed.status_code == 204
    export = client.get(f"{JOBS}/{job}/exports/{export_id}", headers=auth).json()
    assert export["status"] == "failed" and export["error"]["message"] == "out of disk"
    # A poller of …/merged sees the failure, and starts no merge of its own.
    polled = client.get(f"{JOBS}/{job}/merged", headers=auth)
    assert polled.status_code == 200 and polled.json()["id"] == export_id
    assert polled.json()["status"] == "failed"
    again = request(client, auth, job)
    assert again.status_code == 202 and again.json()["id"] != export_id
    assert client.get(f"{JOBS}/{job}/merged", headers=auth).json()["id"] == again.json()["id"]


def test_lost_worker_is_retried_then_fails(client, auth, job, database_url) -> None:
    export_id = request(client, auth, job).json()["id"]
    first = claim(client, export_id)
    expire_lease(database_url, export_id)
    retried = client.get(f"{JOBS}/{job}/exports/{export_id}", headers=auth).json()
    assert retried["status"] == "queued"
    assert upload(client, export_id, first).status_code == 409  # the lost attempt's token is over
    for _ in range(MAX_ATTEMPTS - 1):
        claim(client, export_id)
        expire_lease(database_url, export_id)
        client.get(f"{JOBS}/{job}/exports", headers=auth)
    export = client.get(f"{JOBS}/{job}/exports/{export_id}", headers=auth).json()
    assert export["status"] == "failed" and export["error"]["code"] == "worker_lost"


def test_deleting_the_model_deletes_its_exports(client, auth, job, settings, database_url) -> None:
    export_id = request(client, auth, job).json()["id"]
    upload(client, export_id, claim(client, export_id))
    with session_scope(database_url) as session:
        key = session.scalar(select(Export.storage_key).where(Export.id == export_id))
    model = client.get(f"{JOBS}/{job}", headers=auth).json()["fine_tuned_model"]
    blob = settings.storage_dir / key
    assert blob.is_file()
    assert client.delete(f"/v1/models/{model}", headers=auth).status_code == 200
    assert not blob.exists()
    assert client.get(f"{JOBS}/{job}/exports/{export_id}", headers=auth).status_code == 404
    refused = request(client, auth, job)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_deleted"


def test_exports_count_towards_the_tenants_storage(client, auth, job, settings, database_url) -> None:
    first = request(client, auth, job).json()["id"]
    client.post(f"/internal/v1/exports/{first}/fail", json={"message": "oom"}, headers=claim(client, first))

    def stored() -> int:
        with session_scope(database_url) as session:
            return stored_bytes(session, session.scalar(select(Job.tenant_id).where(Job.id == job)))

    def limited(limit: int) -> TestClient:
        return TestClient(create_app(settings.model_copy(update={"max_stored_bytes_per_tenant": limit})))

    before = stored()
    with limited(before) as full:
        refused = request(full, auth, job)
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "storage_limit_exceeded"
        assert full.get(f"{JOBS}/{job}/merged", headers=auth).json()["id"] == first  # the failed one
    with limited(before + 1) as room:
        second = request(room, auth, job)
        assert second.status_code == 202, second.text
        upload(room, second.json()["id"], claim(room, second.json()["id"]))
    assert stored() == before + len(MERGED_TAR)
