"""Resume states, pause/resume and hand-backs through the worker routes, on a real database."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from app.db import get_engine
from tests.api.test_internal import claim
from tests.utils import CHAT_LINES, upload_file


def put_state(client, job_id: str, attempt: dict, step: int, body: bytes, sha256: str | None = None):
    sha256 = sha256 or hashlib.sha256(body).hexdigest()
    return client.put(
        f"/internal/v1/jobs/{job_id}/resume_states",
        params={"step": step, "sha256": sha256},
        content=body,
        headers=attempt,
    )


def get_job(client, auth, job_id: str) -> dict:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()


def test_states_are_kept_only_complete_and_two_at_a_time(client, job_id, auth):
    _, attempt = claim(client, job_id)
    damaged = put_state(
        client, job_id, attempt, 10, b"truncated", sha256=hashlib.sha256(b"whole").hexdigest()
    )
    assert damaged.status_code == 400 and damaged.json()["error"]["code"] == "state_checksum_mismatch"
    assert get_job(client, auth, job_id)["resumable_step"] is None
    for step in (10, 20, 30):
        assert put_state(client, job_id, attempt, step, f"state {step}".encode()).status_code == 200
    assert get_job(client, auth, job_id)["resumable_step"] == 30

    # A lost worker: the next attempt is offered the two newest states, newest first, and can fetch them.
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "paused"}, headers=attempt)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    reply, second = claim(client, job_id)
    assert [state["step"] for state in reply["resume_states"]] == [30, 20]
    newest = reply["resume_states"][0]
    download = client.get(f"/internal/v1/jobs/{job_id}/resume_states/{newest['id']}", headers=second)
    assert download.content == b"state 30" and download.headers["etag"] == f'"{newest["sha256"]}"'
    # The first attempt's token no longer reads or writes states.
    assert (
        client.get(f"/internal/v1/jobs/{job_id}/resume_states/{newest['id']}", headers=attempt).status_code
        == 409
    )
    assert put_state(client, job_id, attempt, 40, b"zombie").status_code == 409


def test_pause_and_resume_follow_the_job_state(client, job_id, auth):
    # Queued: paused at once; resumed: queued again. Wrong states are 409s in OpenAI's shape.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    assert (
        client.post(
            f"/internal/v1/jobs/{job_id}/claim", headers={"Authorization": "Bearer test-worker-token"}
        ).status_code
        == 409
    )
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth).json()["status"] == "queued"
    wrong = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "job_not_paused"

    # Running: the pause is a request the worker hears in its lease reply; it saves, then reports paused.
    _, attempt = claim(client, job_id)
    asked = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()
    assert asked["status"] == "running" and asked["pause_requested"] is True
    lease = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=attempt).json()
    assert lease == {"cancel_requested": False, "pause_requested": True}
    put_state(client, job_id, attempt, 7, b"paused state")
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "paused"}, headers=attempt)
    paused = get_job(client, auth, job_id)
    assert paused["status"] == "paused" and paused["resumable_step"] == 7 and not paused["pause_requested"]
    assert client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=attempt).status_code == 409
    resumed = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth).json()
    assert resumed["status"] == "queued"
    events = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, "order": "asc"}, headers=auth
    ).json()["data"]
    assert "Job resumed; it continues from step 7" in [e["message"] for e in events]

    # Final jobs can be neither paused nor resumed; a paused job can be cancelled.
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    events = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, "order": "asc"}, headers=auth
    ).json()
    assert events["data"][-1]["message"] == "Job cancelled while paused"
    for action in ("pause", "resume"):
        refused = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=auth)
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "invalid_request_error"


def test_a_requeued_attempt_does_not_count_as_lost(client, job_id, auth):
    for attempt_number in (1, 2, 3, 4):
        reply, attempt = claim(client, job_id)
        assert reply["attempt"] == attempt_number
        done = client.post(
            f"/internal/v1/jobs/{job_id}/complete",
            json={"status": "requeued", "reason": "spot instance reclaimed"},
            headers=attempt,
        )
        assert done.json() == {"status": "queued"}
    job = get_job(client, auth, job_id)
    assert job["status"] == "queued" and job["attempt"] == 4 and job["error"] is None


def test_a_retried_events_post_is_stored_once(client, job_id, auth):
    _, attempt = claim(client, job_id)
    batch = {"events": [{"seq": n, "message": f"event {n}"} for n in (1, 2, 3)]}
    for _ in range(3):
        assert (
            client.post(f"/internal/v1/jobs/{job_id}/events", json=batch, headers=attempt).status_code == 200
        )
    more = {"events": [{"seq": n, "message": f"event {n}"} for n in (3, 4)]}
    client.post(f"/internal/v1/jobs/{job_id}/events", json=more, headers=attempt)
    events = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, "order": "asc"}, headers=auth
    ).json()["data"]
    assert [e["message"] for e in events if e["message"].startswith("event")] == [
        f"event {n}" for n in (1, 2, 3, 4)
    ]


def test_a_failed_commit_is_an_error_and_leaves_no_job(client, auth, settings):
    file_id = upload_file(client, auth, CHAT_LINES)
    engine = get_engine(settings.resolved_database_url)

    def refuse(_connection):
        raise OperationalError("COMMIT", {}, Exception("disk full"))

    event.listen(engine, "commit", refuse)
    try:
        response = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
        )
    finally:
        event.remove(engine, "commit", refuse)
    assert response.status_code >= 500 and response.json()["error"]["type"] == "server_error"
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []


@pytest.mark.parametrize("status", ["paused", "requeued"])
def test_a_cancel_asked_for_while_handing_back_wins(client, job_id, auth, status):
    _, attempt = claim(client, job_id)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": status}, headers=attempt)
    assert get_job(client, auth, job_id)["status"] == "cancelled"
