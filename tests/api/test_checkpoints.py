"""Checkpoints and download formats through the worker routes, as a real worker stores them."""

from __future__ import annotations

import pytest

from tests.api.test_internal import SERVING, claim, tiny_archive
from tests.api.test_jobs import assert_error
from tests.utils import CHAT_LINES, upload_file


@pytest.fixture
def running_job(client, auth):
    file_id = upload_file(client, auth, CHAT_LINES)
    body = {
        "model": "tiny-phi3",
        "training_file": file_id,
        "suffix": "ck",
        "training_config": {"save_steps": 2, "save_total_limit": 2},
    }
    job_id = client.post("/v1/fine_tuning/jobs", json=body, headers=auth).json()["id"]
    _, attempt = claim(client, job_id)
    return job_id, attempt


def store_checkpoint(client, job_id, attempt, step: int, content: bytes) -> dict:
    url = f"/internal/v1/jobs/{job_id}/checkpoints/{step}/adapter"
    assert client.put(url, content=content, headers=attempt).status_code == 200
    metrics = {"step": step, "train_loss": 3.0 - step / 10, "valid_loss": None}
    response = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints", json={"step": step, "metrics": metrics}, headers=attempt
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_checkpoints_are_listed_callable_downloadable_and_pruned(client, auth, running_job, settings):
    job_id, attempt = running_job
    unpublished = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints", json={"step": 1, "metrics": {}}, headers=attempt
    )
    assert unpublished.status_code == 409
    archives = {step: tiny_archive() + bytes([step]) for step in (2, 4, 6)}
    for step, content in archives.items():
        store_checkpoint(client, job_id, attempt, step, content)

    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth).json()
    assert [c["step_number"] for c in listed["data"]] == [6, 4]  # save_total_limit 2 pruned step 2
    newest = listed["data"][0]
    assert newest["object"] == "fine_tuning.job.checkpoint" and newest["fine_tuning_job_id"] == job_id
    assert newest["fine_tuned_model_checkpoint"].endswith(":ckpt-step-6")
    assert newest["metrics"]["train_loss"] == pytest.approx(2.4)
    stored = sorted(p.name for p in (settings.storage_dir / "adapters" / job_id).iterdir())
    assert len(stored) == 2 and not any(name.startswith("step-2-") for name in stored)

    download = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter?checkpoint={newest['id']}", headers=auth)
    assert download.status_code == 200 and download.content == archives[6]
    assert_error(
        client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=auth), 409, code="adapter_not_ready"
    )
    fetched = client.get(f"/internal/v1/adapters/{newest['id']}", headers=SERVING)
    assert fetched.content == archives[6] and fetched.headers["x-phitune-adapter-format"] == "peft"

    chat = {"model": newest["fine_tuned_model_checkpoint"], "messages": [{"role": "user", "content": "hi"}]}
    assert (
        client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 503
    )  # resolved; no server
    chat["model"] = newest["fine_tuned_model_checkpoint"].replace("step-6", "step-2")
    assert_error(client.post("/v1/chat/completions", json=chat, headers=auth), 404, code="model_not_found")


def test_formats_and_the_reason_peft_is_unavailable(client, auth, running_job):
    job_id, attempt = running_job
    loralib_archive = tiny_archive() + b"loralib"
    client.put(f"/internal/v1/jobs/{job_id}/adapter?format=loralib", content=loralib_archive, headers=attempt)
    reason = "qkv_slices ['q', 'v'] on the fused qkv_proj have no PEFT form"
    done = client.post(
        f"/internal/v1/jobs/{job_id}/complete",
        json={"status": "succeeded", "peft_unavailable_reason": reason, "shipped_step": 4},
        headers=attempt,
    )
    assert done.status_code == 200
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "succeeded" and job["shipped_step"] == 4
    error = assert_error(
        client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=auth), 409, param="format"
    )
    assert error["message"] == reason
    assert_error(
        client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter?format=bin", headers=auth), 400, param="format"
    )
    loralib = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter?format=loralib", headers=auth)
    assert loralib.status_code == 200 and loralib.content == loralib_archive
    served = client.get(f"/internal/v1/adapters/{job_id}", headers=SERVING)
    assert served.headers["x-phitune-adapter-format"] == "loralib"


def test_a_superseded_attempt_cannot_store_artifacts(client, running_job, database_url):
    from sqlalchemy import update

    from app.db import session_scope
    from app.jobs.leases import reap_expired_leases
    from app.models import Job

    job_id, attempt = running_job
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
    reap_expired_leases(database_url)
    claim(client, job_id)
    stale = client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    assert stale.status_code == 409


@pytest.mark.parametrize("route", ["adapter", "resume_states?step=3&sha256=" + "0" * 64])
def test_an_attempt_superseded_while_its_upload_streams_in_stores_nothing(
    client, running_job, database_url, route, settings
):
    """The attempt is checked again once the body is in, against the row as it is then: a copy of the job
    loaded before the body streamed in must not let a superseded attempt store anything."""
    from sqlalchemy import select, update

    from app.db import session_scope
    from app.internal.service import claim_job
    from app.jobs.leases import reap_expired_leases
    from app.models import Artifact, Job, ResumeState

    job_id, attempt = running_job

    def body():
        yield b"first half of the archive"
        # While the body streams in, the worker goes silent, its lease is reaped and attempt 2 claims the job.
        with session_scope(database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
        reap_expired_leases(database_url)
        with session_scope(database_url) as session:  # the claim's own work: the client is busy sending
            claim_job(session, settings, job_id)
        yield b"second half"

    stale = client.put(f"/internal/v1/jobs/{job_id}/{route}", content=body(), headers=attempt)
    assert_error(stale, 409, code="attempt_superseded")
    with session_scope(database_url) as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
        assert session.scalars(select(ResumeState).where(ResumeState.job_id == job_id)).all() == []
    stored = [
        p for p in settings.storage_dir.rglob("*") if p.is_file() and p.parts[-3] in ("adapters", "resume")
    ]
    assert stored == []
