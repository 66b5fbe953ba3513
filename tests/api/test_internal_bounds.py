"""What a worker reports is bounded and valid Unicode (app.internal.contracts), so that a compromised worker
cannot make its tenant's reads of the job fail or swell; and an attempt token is checked before the job's row
is looked up (app.internal.service.attempt_job)."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_scope
from app.jobs.leases import reap_expired_leases
from app.limits import MAX_DATA_PAIRS, MAX_REPORTED_STEP
from app.models import Artifact, Checkpoint, Job, JobEvent
from app.repositories import jobs
from tests.api.test_internal import WORKER, claim, tiny_archive

LONE_SURROGATE = "\\ud800"  # as JSON spells it: UTF-8 cannot encode it, so httpx's json= cannot send it


def post_raw(client: TestClient, path: str, raw: str, headers: dict[str, str]):
    """POST a JSON text as it is (lone surrogate escapes, NaN)."""
    return client.post(path, content=raw.encode(), headers={**headers, "Content-Type": "application/json"})


def assert_refused(response) -> dict:
    """A 400 (the app's answer to a validation error) in the OpenAI error shape."""
    assert response.status_code in (400, 413, 422), response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error


def assert_reads_work(client: TestClient, auth: dict[str, str], job_id: str) -> dict:
    """The tenant's reads of the job all answer, as JSON."""
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth)
    assert job.status_code == 200, job.text
    listed = client.get("/v1/fine_tuning/jobs", headers=auth)
    assert listed.status_code == 200, listed.text
    for path in ("events", "checkpoints"):
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}/{path}", headers=auth)
        assert response.status_code == 200, response.text
    return job.json()


def stored_events(database_url: str, job_id: str) -> list[tuple[str, dict | None]]:
    with session_scope(database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        return [(row.message, row.data) for row in rows]


def event(**fields) -> str:
    return json.dumps({"message": "m", **fields})


BAD_OUTCOMES = [
    # A lone surrogate: stored, every read of the job was a 500.
    '{"status": "failed", "error": {"message": "x", "code": "' + LONE_SURROGATE + '"}}',
    '{"status": "failed", "error": {"message": "' + LONE_SURROGATE + '"}}',
    '{"status": "failed", "error": {"message": "x", "code": "' + "c" * 65 + '"}}',
    '{"status": "failed", "error": {"message": "' + "m" * 4001 + '"}}',
    '{"status": "requeued", "reason": "' + LONE_SURROGATE + '"}',
    '{"status": "succeeded", "peft_unavailable_reason": "' + LONE_SURROGATE + '"}',
    '{"status": "succeeded", "trained_tokens": -1}',
    '{"status": "succeeded", "trained_tokens": ' + str(2**63) + "}",
    '{"status": "succeeded", "shipped_step": 0}',
    '{"status": "succeeded", "shipped_step": ' + str(2**70) + "}",
]


@pytest.mark.parametrize("raw", BAD_OUTCOMES, ids=range(len(BAD_OUTCOMES)))
def test_a_bad_outcome_is_refused_and_the_job_stays_readable(client, job_id, auth, raw):
    _, attempt = claim(client, job_id)
    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    assert_refused(post_raw(client, f"/internal/v1/jobs/{job_id}/complete", raw, attempt))
    job = assert_reads_work(client, auth, job_id)
    assert job["status"] == "running" and job["error"] is None
    # The attempt goes on, and can still report an outcome.
    done = client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    assert done.status_code == 200, done.text


def test_a_three_megabyte_error_code_is_refused(client, job_id, auth):
    _, attempt = claim(client, job_id)
    outcome = {"status": "failed", "error": {"message": "x", "code": "c" * 3_000_000}}
    response = client.post(f"/internal/v1/jobs/{job_id}/complete", json=outcome, headers=attempt)
    assert_refused(response)
    assert assert_reads_work(client, auth, job_id)["status"] == "running"


BAD_EVENTS = [
    # A lone surrogate in a value, in a key: stored, every read of the events was a 500.
    event(type="metrics", data={"step": "@", "k@": 1}).replace("@", LONE_SURROGATE),
    event(data={"k": "@"}).replace("@", LONE_SURROGATE),
    event(data={"k@": 1}).replace("@", LONE_SURROGATE),
    event(message="@").replace("@", LONE_SURROGATE),
    event(data={"k": "v" * 257}),
    event(data={"k" * 65: 1}),
    event(data={"": 1}),
    event(data={f"k{i}": i for i in range(MAX_DATA_PAIRS + 1)}),
    event(data={"nested": {"a": 1}}),
    event(data={"list": [1, 2]}),
    event(data={"big": 2**63}),
    event(data={"small": -(2**63) - 1}),
    # A metrics event's step, total_steps and epoch become the job's progress, which every read computes with.
    event(type="metrics", data={"step": "5"}),
    event(type="metrics", data={"step": 1.5}),
    event(type="metrics", data={"step": True}),
    event(type="metrics", data={"step": -1}),
    event(type="metrics", data={"step": MAX_REPORTED_STEP + 1}),
    event(type="metrics", data={"step": 5, "total_steps": "20"}),
    event(type="metrics", data={"step": 5, "epoch": "one"}),
]


@pytest.mark.parametrize("raw_event", BAD_EVENTS, ids=range(len(BAD_EVENTS)))
def test_a_bad_event_is_refused_and_nothing_is_stored(client, job_id, auth, database_url, raw_event):
    _, attempt = claim(client, job_id)
    before = len(stored_events(database_url, job_id))
    good = event(type="metrics", data={"step": 1, "total_steps": 4})
    raw = '{"events": [' + good + ", " + raw_event + "]}"
    assert_refused(post_raw(client, f"/internal/v1/jobs/{job_id}/events", raw, attempt))
    assert len(stored_events(database_url, job_id)) == before  # neither event: the post is refused whole
    job = assert_reads_work(client, auth, job_id)
    assert job["progress"]["step"] == 0


def test_the_workers_own_events_are_accepted(client, job_id, auth, database_url):
    """What worker/recipe.py sends: flat figures, a device name, booleans, null, and a diverged run's NaN."""
    _, attempt = claim(client, job_id)
    metrics = {
        "step": 2,
        "total_steps": 4,
        "epoch": 0.5,
        "train_loss": math.nan,
        "learning_rate": 1e-4,
        "tokens_per_second": 123.4,
        "eval_loss": math.inf,
        "eval_mean_token_accuracy": None,
    }
    figures = {"gradient_checkpointing": False, "estimated_memory_bytes": 2**40, "device": "cuda:0"}
    raw = json.dumps(  # NaN and Infinity, as Python's json writes them
        {
            "events": [
                {"seq": 1, "type": "metrics", "message": "Step 2/4", "data": metrics},
                {"seq": 2, "type": "message", "message": "Peak memory", "data": figures},
                {"seq": 3, "type": "metrics", "message": "no step", "data": {"note": "x" * 256}},
            ]
        }
    )
    response = post_raw(client, f"/internal/v1/jobs/{job_id}/events", raw, attempt)
    assert response.status_code == 200, response.text
    job = assert_reads_work(client, auth, job_id)
    assert job["progress"] == {"step": 2, "total_steps": 4, "epoch": 0.5, "percent": 50.0}
    data = dict(stored_events(database_url, job_id))
    assert data["Step 2/4"] == {**metrics, "train_loss": None, "eval_loss": None}
    assert data["Peak memory"] == figures


@pytest.mark.parametrize("step", ["-5", "0", str(MAX_REPORTED_STEP + 1), str(2**70), "1e3"])
def test_a_checkpoint_adapter_of_a_step_out_of_range_is_refused(client, job_id, auth, database_url, step):
    _, attempt = claim(client, job_id)
    response = client.put(
        f"/internal/v1/jobs/{job_id}/checkpoints/{step}/adapter", content=tiny_archive(), headers=attempt
    )
    assert_refused(response)
    with session_scope(database_url) as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    assert assert_reads_work(client, auth, job_id)["status"] == "running"


BAD_CHECKPOINTS = [
    '{"step": ' + str(2**70) + ', "metrics": {}}',
    '{"step": ' + str(MAX_REPORTED_STEP + 1) + ', "metrics": {}}',
    '{"step": -5, "metrics": {}}',
    '{"step": 1, "metrics": {"k": "' + LONE_SURROGATE + '"}}',
    '{"step": 1, "metrics": {"k' + LONE_SURROGATE + '": 1}}',
    '{"step": 1, "metrics": {"nested": {"a": 1}}}',
    '{"step": 1, "metrics": {"valid_loss": "low"}}',
    '{"step": 1, "metrics": ' + json.dumps({f"k{i}": 1 for i in range(MAX_DATA_PAIRS + 1)}) + "}",
]


@pytest.mark.parametrize("raw", BAD_CHECKPOINTS, ids=range(len(BAD_CHECKPOINTS)))
def test_a_bad_checkpoint_report_is_refused(client, job_id, auth, database_url, raw):
    _, attempt = claim(client, job_id)
    uploaded = client.put(
        f"/internal/v1/jobs/{job_id}/checkpoints/1/adapter", content=tiny_archive(), headers=attempt
    )
    assert uploaded.status_code == 200, uploaded.text
    assert_refused(post_raw(client, f"/internal/v1/jobs/{job_id}/checkpoints", raw, attempt))
    with session_scope(database_url) as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
    assert_reads_work(client, auth, job_id)
    # The worker's own report of the step is still listed.
    metrics = {"step": 1, "train_loss": 2.0, "valid_loss": math.nan, "valid_mean_token_accuracy": None}
    published = post_raw(
        client,
        f"/internal/v1/jobs/{job_id}/checkpoints",
        json.dumps({"step": 1, "metrics": metrics}),
        attempt,
    )
    assert published.status_code == 200, published.text
    assert published.json()["metrics"] == {**metrics, "valid_loss": None}


# --- Defect 6: the token before the row ---


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids the attempt routes look up (and, on PostgreSQL, lock)."""
    seen: list[str] = []
    lock = jobs.lock

    def counted(session, job_id, *args, **kwargs):
        seen.append(job_id)
        return lock(session, job_id, *args, **kwargs)

    monkeypatch.setattr(jobs, "lock", counted)
    return seen


def test_a_forged_attempt_token_never_reaches_the_jobs_row(client, job_id, auth, database_url, lookups):
    body, first = claim(client, job_id)
    # Attempt 1 is superseded by attempt 2: its lease lost, the job queued again and claimed.
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
    reap_expired_leases(database_url)
    second_body, second = claim(client, job_id)
    assert second_body["attempt"] == 2
    lookups.clear()

    genuine_mac = body["token"].split(".", 1)[1]
    forged = [
        "1." + "A" * 43,  # a superseded attempt's number
        "2." + "A" * 43,  # the running attempt's number
        "3." + genuine_mac,  # a genuine MAC under another attempt number
        "7." + "A" * 43,
        "01.abc",
        "1.abc def",
        "9" * 40 + ".abc",
    ]
    answers = set()
    for token in forged:
        for job in (job_id, "ftjob-doesnotexist"):
            headers = {"Authorization": f"Bearer {token}"}
            for method, path in (("POST", "heartbeat"), ("POST", "events"), ("PUT", "adapter")):
                kwargs = {"json": {"events": []}} if path == "events" else {}
                response = client.request(
                    method, f"/internal/v1/jobs/{job}/{path}", headers=headers, **kwargs
                )
                assert response.status_code == 401, response.text
                answers.add(response.text)
    # A genuine token of another job.
    other = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-phi3", "training_file": body["training_file"]},
        headers=auth,
    ).json()["id"]
    _, other_attempt = claim(client, other)
    lookups.clear()
    response = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=other_attempt)
    assert response.status_code == 401
    answers.add(response.text)
    assert len(answers) == 1, answers
    assert lookups == [], "a token that does not verify must not lead to the job's lookup"

    # Only a token that verifies reaches the row: the superseded attempt's learns it was superseded, the
    # running attempt's is served.
    stale = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=first)
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "attempt_superseded"
    assert client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=second).status_code == 200
    assert lookups == [job_id, job_id]


def test_the_worker_token_is_no_attempt_token(client, job_id, lookups):
    claim(client, job_id)
    lookups.clear()
    response = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=WORKER)
    assert response.status_code == 401
    assert lookups == []
