"""Result files: a succeeded job's per-step metrics as a CSV file of the tenant, built from the metrics events
its worker posted (driven here through the worker routes, as a worker does)."""

from __future__ import annotations

from app.db import session_scope
from app.repositories import files
from tests.api.test_internal import claim, tiny_archive
from tests.api.test_jobs import assert_error, create
from tests.utils import CHAT_LINES, upload_file

HEADER = "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy\n"


def metrics(step: int, loss: float, **more) -> dict:
    data = {"step": step, "total_steps": 8, "epoch": step / 8, "train_loss": loss, "learning_rate": 1e-4}
    return {"type": "metrics", "message": f"Step {step}/8", "data": {**data, **more}}


def post(client, job_id: str, attempt: dict[str, str], *events: dict) -> None:
    body = {"events": list(events)}
    response = client.post(f"/internal/v1/jobs/{job_id}/events", json=body, headers=attempt)
    assert response.status_code == 200, response.text


def succeed(client, job_id: str, attempt: dict[str, str]):
    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    return client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)


def queued_job(client, auth) -> str:
    dataset = upload_file(client, auth, CHAT_LINES)
    return create(client, auth, training_file=dataset, validation_file=dataset).json()["id"]


def result_file(client, auth, job_id: str) -> dict:
    (file_id,) = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["result_files"]
    return client.get(f"/v1/files/{file_id}", headers=auth).json()


def test_the_result_file_is_the_csv_of_the_metrics_events(client, auth):
    job_id = queued_job(client, auth)
    _, attempt = claim(client, job_id)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["result_files"] == []
    post(
        client,
        job_id,
        attempt,
        metrics(2, 2.5, train_mean_token_accuracy=0.25),
        {"type": "message", "message": "not a metric", "data": {"step": 3}},
        metrics(4, 1.75, train_mean_token_accuracy=0.5, eval_loss=2.0, eval_mean_token_accuracy=0.375),
        metrics(6, 1.5),  # from a worker that does not report train accuracy: an empty cell
        metrics(8, None, train_mean_token_accuracy=0.75, eval_loss=1.25, eval_mean_token_accuracy=0.625),
    )
    assert succeed(client, job_id, attempt).status_code == 200

    file = result_file(client, auth, job_id)
    assert file["purpose"] == "fine-tune-results" and file["stats"] is None
    assert file["filename"] == f"{job_id}-step_metrics.csv"
    content = client.get(f"/v1/files/{file['id']}/content", headers=auth)
    assert content.status_code == 200 and content.headers["content-type"].startswith("text/csv")
    assert content.text == HEADER + "2,2.5,0.25,,\n4,1.75,0.5,2.0,0.375\n6,1.5,,,\n8,,0.75,1.25,0.625\n"
    assert file["bytes"] == len(content.content)


def test_a_resumed_attempt_replaces_the_steps_it_trained_again(client, auth):
    job_id = queued_job(client, auth)
    _, first = claim(client, job_id)
    post(client, job_id, first, metrics(2, 3.0), metrics(4, 2.0), metrics(6, 1.0))
    requeued = client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "requeued"}, headers=first)
    assert requeued.json()["status"] == "queued"
    _, second = claim(client, job_id)  # resumed from its state of step 2: steps 4 and 6 are trained anew
    post(client, job_id, second, metrics(4, 2.5), metrics(6, 1.5), metrics(8, 0.5))
    assert succeed(client, job_id, second).status_code == 200
    content = client.get(f"/v1/files/{result_file(client, auth, job_id)['id']}/content", headers=auth)
    assert content.text == HEADER + "2,3.0,,,\n4,2.5,,,\n6,1.5,,,\n8,0.5,,,\n"


def test_a_success_reported_twice_makes_one_result_file(client, auth):
    job_id = queued_job(client, auth)
    _, attempt = claim(client, job_id)
    post(client, job_id, attempt, metrics(2, 1.0))
    assert succeed(client, job_id, attempt).status_code == 200
    again = client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    assert_error(again, 409, code="attempt_over")
    listed = client.get("/v1/files", params={"purpose": "fine-tune-results"}, headers=auth).json()["data"]
    assert [file["id"] for file in listed] == [result_file(client, auth, job_id)["id"]]


def test_only_a_success_makes_a_result_file(client, auth):
    job_id = queued_job(client, auth)
    _, attempt = claim(client, job_id)
    post(client, job_id, attempt, metrics(2, 1.0))
    failed = {"status": "failed", "error": {"message": "out of memory"}}
    client.post(f"/internal/v1/jobs/{job_id}/complete", json=failed, headers=attempt)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["result_files"] == []
    assert client.get("/v1/files", params={"purpose": "fine-tune-results"}, headers=auth).json()["data"] == []


def test_result_files_are_listed_by_purpose_counted_and_deletable(client, auth, other_auth, database_url):
    job_id = queued_job(client, auth)
    _, attempt = claim(client, job_id)
    post(client, job_id, attempt, metrics(2, 1.0))
    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    tenant = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["organization_id"]
    with session_scope(database_url) as session:
        before = files.stored_bytes(session, tenant)  # the dataset and the adapter
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    file = result_file(client, auth, job_id)
    with session_scope(database_url) as session:
        assert files.stored_bytes(session, tenant) == before + file["bytes"]

    def listed(**params) -> list[str]:
        return [row["purpose"] for row in client.get("/v1/files", params=params, headers=auth).json()["data"]]

    assert sorted(listed()) == ["fine-tune", "fine-tune-results"]
    assert listed(purpose="fine-tune") == ["fine-tune"]
    assert listed(purpose="fine-tune-results") == ["fine-tune-results"]
    assert client.get(f"/v1/files/{file['id']}", headers=other_auth).status_code == 404

    assert client.delete(f"/v1/files/{file['id']}", headers=auth).json()["deleted"] is True
    assert client.get(f"/v1/files/{file['id']}/content", headers=auth).status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["result_files"] == []
    with session_scope(database_url) as session:
        assert files.stored_bytes(session, tenant) == before


def test_a_result_file_is_neither_trained_on_nor_uploaded(client, auth):
    job_id = queued_job(client, auth)
    _, attempt = claim(client, job_id)
    succeed(client, job_id, attempt)
    results = result_file(client, auth, job_id)["id"]
    dataset = upload_file(client, auth, CHAT_LINES)
    jobs_before = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]
    for field, body in (
        ("training_file", {"training_file": results}),
        ("validation_file", {"training_file": dataset, "validation_file": results}),
    ):
        error = assert_error(create(client, auth, **body), 400, param=field, code="invalid_file_purpose")
        assert "fine-tune-results" in error["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == jobs_before
    upload = client.post(
        "/v1/files",
        files={"file": ("m.jsonl", b'{"text": "hi"}\n', "application/jsonl")},
        data={"purpose": "fine-tune-results"},
        headers=auth,
    )
    assert_error(upload, 400, param="purpose", code="invalid_value")
