"""Worker routes on a real database: claiming, attempt-scoped tokens, progress, cancellation, outcomes."""

from __future__ import annotations

import gzip
import io
import tarfile

from sqlalchemy import update

from app.db import session_scope
from app.jobs.leases import MAX_ATTEMPTS, reap_expired_leases
from app.models import Job
from tests.utils import CHAT_LINES, jsonl, upload_file

WORKER = {"Authorization": "Bearer test-worker-token"}  # the claim token (tests/conftest.py's settings)
SERVING = {"Authorization": "Bearer test-serving-token"}  # the inference server's, for adapter downloads


def claim(client, job_id: str) -> tuple[dict, dict[str, str]]:
    response = client.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER)
    assert response.status_code == 200, response.text
    body = response.json()
    return body, {"Authorization": f"Bearer {body['token']}"}


def tiny_archive() -> bytes:
    """A small adapter archive, byte-identical on every call (gzip's header time is fixed)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"{}"
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def succeeded_job(client, auth: dict[str, str]) -> str:
    """The id of a job that succeeded through the worker routes, as a real worker's would."""
    file_id = upload_file(client, auth, CHAT_LINES)
    job_id = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-phi3", "training_file": file_id, "suffix": "bot"},
        headers=auth,
    ).json()["id"]
    _, attempt = claim(client, job_id)
    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    return job_id


def test_internal_routes_are_not_in_the_public_schema(client):
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/internal")]


def test_claim_needs_the_worker_token_and_a_queued_job(client, job_id, auth):
    assert client.post(f"/internal/v1/jobs/{job_id}/claim").status_code == 401
    assert client.post(f"/internal/v1/jobs/{job_id}/claim", headers=auth).status_code == 401
    body, _ = claim(client, job_id)
    assert body["attempt"] == 1 and body["model"] == "tiny-phi3"
    assert body["training_config"]["learning_rate"] == 2e-4
    again = client.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER)
    assert again.status_code == 409
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "running"


def test_attempt_token_downloads_only_its_own_files(client, job_id, auth):
    body, attempt = claim(client, job_id)
    content = client.get(f"/internal/v1/jobs/{job_id}/files/{body['training_file']}", headers=attempt)
    assert content.status_code == 200 and content.content == jsonl(CHAT_LINES)
    other_file = upload_file(client, auth, CHAT_LINES, name="other.jsonl")
    assert client.get(f"/internal/v1/jobs/{job_id}/files/{other_file}", headers=attempt).status_code == 404
    assert (
        client.get(f"/internal/v1/jobs/{job_id}/files/{body['training_file']}", headers=WORKER).status_code
        == 401
    )


def test_metrics_events_move_progress_and_heartbeat_carries_cancel(client, job_id, auth):
    _, attempt = claim(client, job_id)
    metrics = {"step": 5, "total_steps": 20, "epoch": 0.5, "train_loss": 2.5, "learning_rate": 1e-4}
    response = client.post(
        f"/internal/v1/jobs/{job_id}/events",
        json={"events": [{"type": "metrics", "message": "Step 5/20", "data": metrics}]},
        headers=attempt,
    )
    assert response.json() == {"cancel_requested": False, "pause_requested": False}
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["progress"] == {"step": 5, "total_steps": 20, "epoch": 0.5, "percent": 25.0}

    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()
    assert cancelled["status"] == "running" and cancelled["cancel_requested"]
    assert client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=attempt).json() == {
        "cancel_requested": True,
        "pause_requested": False,
    }
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "cancelled"}, headers=attempt)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    assert client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=attempt).status_code == 409


def test_success_needs_an_adapter_and_names_the_model(client, job_id, auth):
    _, attempt = claim(client, job_id)
    early = client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    assert early.status_code == 409
    archive = tiny_archive()
    assert (
        client.put(f"/internal/v1/jobs/{job_id}/adapter", content=archive, headers=attempt).status_code == 200
    )
    done = client.post(
        f"/internal/v1/jobs/{job_id}/complete",
        json={"status": "succeeded", "trained_tokens": 1234},
        headers=attempt,
    )
    assert done.status_code == 200
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "succeeded" and job["trained_tokens"] == 1234
    assert job["fine_tuned_model"].startswith("ft:tiny-phi3:") and job["progress"]["percent"] == 100.0
    download = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=auth)
    assert download.status_code == 200 and download.content == archive
    assert download.headers["etag"].strip('"') and download.headers["accept-ranges"] == "bytes"
    ranged = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers={**auth, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == archive[:10]
    assert_conflict = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert (
        assert_conflict.status_code == 409
        and assert_conflict.json()["error"]["code"] == "job_not_cancellable"
    )


def test_failure_is_reported_with_a_readable_message(client, job_id, auth):
    _, attempt = claim(client, job_id)
    client.post(
        f"/internal/v1/jobs/{job_id}/complete",
        json={"status": "failed", "error": {"message": "CUDA out of memory"}},
        headers=attempt,
    )
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "training_failed", "message": "CUDA out of memory", "param": None}


def test_expired_lease_requeues_and_supersedes_the_old_attempt(client, job_id, auth, database_url):
    _, first = claim(client, job_id)
    for attempt_number in range(1, MAX_ATTEMPTS + 1):
        with session_scope(database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
        reap_expired_leases(database_url)
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
        if attempt_number < MAX_ATTEMPTS:
            assert job["status"] == "queued"
            body, _ = claim(client, job_id)
            assert body["attempt"] == attempt_number + 1
            stale = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=first)
            assert stale.status_code == 409 and stale.json()["error"]["code"] == "attempt_superseded"
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
