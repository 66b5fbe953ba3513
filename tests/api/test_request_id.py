"""X-Request-ID: kept when sane, made when not, answered on every response (errors included), and carried
by the training message of the job the request created; the log format those ids end up in."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from app.broker import TRAINING_QUEUE, make_celery
from app.log_setup import TASK_REQUEST_ID, ContextFilter, JsonFormatter, attempt, job_id, request_id
from app.main import create_app
from tests.utils import CHAT_LINES, upload_file

SANE = "req-01.abc:DEF_9"


def fresh(value: str | None) -> bool:
    return value is not None and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("GET", "/v1/models", None, 401),  # no key
        ("GET", "/no/such/route", None, 404),
        ("POST", "/v1/fine_tuning/jobs", b"{" + b" " * (5 * 1024 * 1024) + b"}", 413),  # past the body limit
    ],
)
def test_every_answer_carries_the_request_id(client: TestClient, method, path, body, status) -> None:
    answered = client.request(method, path, content=body, headers={"X-Request-ID": SANE})
    assert answered.status_code == status
    assert answered.headers["x-request-id"] == SANE


def test_a_validation_error_carries_it_too(client: TestClient, auth) -> None:
    answered = client.post("/v1/fine_tuning/jobs", json={"model": 3}, headers={**auth, "X-Request-ID": SANE})
    assert answered.status_code == 400 and answered.headers["x-request-id"] == SANE


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", 'quote"d', "{brace}"])
def test_an_id_that_is_not_sane_is_replaced_by_a_fresh_one(client: TestClient, given: str) -> None:
    answered = client.get("/healthz", headers={"X-Request-ID": given})
    assert fresh(answered.headers["x-request-id"]) and answered.headers["x-request-id"] != given


def test_each_request_without_an_id_gets_its_own(client: TestClient) -> None:
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5 and all(fresh(value) for value in ids)


def test_the_training_message_carries_the_id_of_the_request_that_queued_the_job(settings, auth) -> None:
    own = settings.model_copy(update={"broker_url": None})  # a filesystem queue of this test's own
    with TestClient(create_app(own)) as client:
        file_id = upload_file(client, auth, CHAT_LINES)
        created = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-phi3", "training_file": file_id},
            headers={**auth, "X-Request-ID": SANE},
        )
    assert created.status_code == 200, created.text
    celery = make_celery(own)
    with celery.connection_for_read() as connection:
        message = connection.SimpleQueue(TRAINING_QUEUE, no_ack=True).get(timeout=5)
    # The job id stays the task's one argument (workers of earlier versions take it as it was); the request
    # id rides in a header they ignore.
    assert json.loads(message.body)[0] == [created.json()["id"]]
    assert message.headers[TASK_REQUEST_ID] == SANE


def test_a_json_line_holds_the_fields_and_the_context_where_it_was_logged() -> None:
    record = logging.LogRecord("worker.tasks", logging.WARNING, __file__, 1, "step %d", (3,), None)
    tokens = [request_id.set("req-1"), job_id.set("ftjob-1"), attempt.set(2)]
    try:
        ContextFilter("worker").filter(record)
    finally:
        for variable, token in zip((request_id, job_id, attempt), tokens, strict=True):
            variable.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line.pop("ts").endswith("Z")
    assert line == {
        "level": "WARNING",
        "logger": "worker.tasks",
        "message": "step 3",
        "role": "worker",
        "request_id": "req-1",
        "job_id": "ftjob-1",
        "attempt": 2,
    }
