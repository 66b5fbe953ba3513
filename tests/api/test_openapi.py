"""/openapi.json describes every object the public API answers with: real files, jobs, events, checkpoints,
models, errors and chat completions (non-streamed and streamed) validate against the published schema and
against the route's declared response model, and declaring the models changed no response.

jsonschema is not installed, so `validate` below checks the JSON Schema keywords that pydantic and FastAPI
emit ($ref, anyOf, type, enum, const, properties, required, additionalProperties, items); an unknown
structural keyword fails the test rather than passing unchecked. The chat completion is a real one: the
app's inference client is pointed at an httpx.MockTransport that answers /generate as the inference server
does.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter

from app.chat.schemas import ChatCompletion, ChatCompletionChunk
from app.db import session_scope
from app.errors import ErrorResponse
from app.files.schemas import FileDeleted, FileList, FileObject
from app.jobs.estimate import JobCreateResponse
from app.jobs.schemas import (
    FineTuningJob,
    FineTuningJobEvent,
    JobCheckpoint,
    JobCheckpointList,
    JobEventList,
    JobList,
)
from app.main import Health, NotReady, Ready, create_app
from app.models import Checkpoint, Job, JobEvent
from app.models_api.schemas import Model, ModelDeleted, ModelList
from app.models_api.service import SERVER_START
from tests.api.test_checkpoints import store_checkpoint
from tests.api.test_internal import claim, succeeded_job, tiny_archive
from tests.utils import CHAT_LINES, upload_file

PUBLIC_PREFIXES = ("/v1/", "/healthz", "/readyz")
TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}
# Keywords that only annotate; anything else unknown makes `validate` fail loudly.
ANNOTATIONS = {"title", "description", "default", "format", "examples", "discriminator"}


def validate(instance: Any, schema: dict[str, Any], components: dict[str, Any], where: str = "$") -> None:
    """Raise AssertionError unless `instance` satisfies `schema` (refs resolved in `components`)."""
    if "$ref" in schema:
        validate(
            instance, components[schema["$ref"].removeprefix("#/components/schemas/")], components, where
        )
    if "anyOf" in schema:
        problems = []
        for option in schema["anyOf"]:
            try:
                validate(instance, option, components, where)
                break
            except AssertionError as problem:
                problems.append(str(problem))
        else:
            raise AssertionError(f"{where}: {instance!r} matches no anyOf option: {problems}")
    for option in schema.get("allOf", []):
        validate(instance, option, components, where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        matches = [
            isinstance(instance, TYPES[name]) and not (name in ("integer", "number") and instance is True)
            for name in types
        ]
        assert any(matches) and not (isinstance(instance, bool) and "boolean" not in types), (
            f"{where}: {instance!r} is not of type {types}"
        )
    if "const" in schema:
        assert instance == schema["const"], f"{where}: {instance!r} != {schema['const']!r}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{where}: {instance!r} not in {schema['enum']}"
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        missing = set(schema.get("required", [])) - set(instance)
        assert not missing, f"{where}: missing {sorted(missing)}"
        for key, value in instance.items():
            if key in properties:
                validate(value, properties[key], components, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{where}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(value, schema["additionalProperties"], components, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            validate(item, schema["items"], components, f"{where}[{index}]")
    known = {"$ref", "anyOf", "allOf", "type", "const", "enum", "properties", "required"}
    unknown = set(schema) - known - ANNOTATIONS - {"additionalProperties", "items"}
    assert not unknown, f"{where}: the test's validator does not check {sorted(unknown)}"


@pytest.fixture
def openapi(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def assert_documented(
    openapi: dict[str, Any],
    response: httpx.Response,
    method: str,
    path: str,
    model: type[BaseModel],
    *,
    media_type: str = "application/json",
    body: Any = None,
) -> dict[str, Any]:
    """`response` (or `body`, for one event of a stream) validates against the schema /openapi.json
    publishes for `method path` at its status, which is `model`'s; and against `model` itself."""
    responses = openapi["paths"][path][method]["responses"]
    content = responses[str(response.status_code)]["content"][media_type]
    schema = event_data_schema(content) if media_type == "text/event-stream" else content["schema"]
    assert schema == {"$ref": f"#/components/schemas/{model.__name__}"}, schema
    body = response.json() if body is None else body
    validate(body, schema, openapi["components"]["schemas"])
    model.model_validate(body)
    return body


def event_data_schema(content: dict[str, Any]) -> dict[str, Any]:
    """The schema of an event's JSON `data` in `text/event-stream` content (app.openapi_parts.event_stream:
    OpenAPI 3.2's `itemSchema`, each event with its `data`)."""
    return content["itemSchema"]["properties"]["data"]["anyOf"][0]["contentSchema"]


def as_json(rendered: Any) -> Any:
    return json.loads(json.dumps(TypeAdapter(Any).dump_python(rendered, mode="json")))


def assert_unchanged(body: dict[str, Any], rendered: Any) -> None:
    """Same keys, same order, same values as the wire format written out for its row."""
    rendered = as_json(rendered)
    assert list(body) == list(rendered)
    assert body == rendered


def job_object(job: Job) -> dict[str, Any]:
    """The fine_tuning.job wire format, written out here so that a change to the models shows as a diff."""
    progress = job.progress or {}
    step, total = progress.get("step", 0), progress.get("total_steps")
    percent = 100.0 if job.status == "succeeded" else round(100.0 * step / total, 1) if total else 0.0
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant_id,
        "status": job.status,
        "hyperparameters": job.hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "result_files": [],
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "estimated_finish": None,
        "metadata": job.job_metadata,
        "error": job.error,
        "training_config": job.training_config,
        "peft_config": job.peft_config,
        "progress": {"step": step, "total_steps": total, "epoch": progress.get("epoch"), "percent": percent},
        "attempt": job.attempt,
        "cancel_requested": job.cancel_requested,
        "pause_requested": job.pause_requested,
        "resumable_step": job.resumable_step,
        "shipped_step": job.shipped_step,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_object(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuning_job_id": checkpoint.job_id,
        "step_number": checkpoint.step_number,
        "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
        "metrics": checkpoint.metrics,
    }


@pytest.fixture
def inference(client):
    """The app's inference client answering /generate as the inference server does."""

    def generate(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        done = {"finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 2}
        if not body["stream"]:
            return httpx.Response(200, json={"text": "4.", **done})
        events = [{"delta": "4"}, {"delta": "."}, done]
        return httpx.Response(200, content="".join(f"data: {json.dumps(e)}\n\n" for e in events).encode())

    real = client.app.state.inference
    client.app.state.inference = httpx.AsyncClient(
        transport=httpx.MockTransport(generate), base_url="http://inference"
    )
    yield
    client.app.state.inference = real


def test_every_public_json_operation_publishes_a_response_schema(openapi):
    operations = [
        (method, path, operation)
        for path, methods in openapi["paths"].items()
        for method, operation in methods.items()
        if path.startswith(PUBLIC_PREFIXES)
    ]
    assert {path for _, path, _ in operations} >= {"/v1/files", "/v1/fine_tuning/jobs", "/healthz", "/readyz"}
    assert not [path for path in openapi["paths"] if not path.startswith(PUBLIC_PREFIXES)]
    downloads = {
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/adapter",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports/{export_id}/content",
    }
    for method, path, operation in operations:
        ok = operation["responses"]["200"]["content"]
        if path in downloads:
            assert "application/json" not in ok and next(iter(ok.values()))["schema"], (method, path)
            continue
        schema = ok["application/json"]["schema"]
        assert (
            schema
            and schema["$ref"].removeprefix("#/components/schemas/") in openapi["components"]["schemas"]
        ), (method, path)
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                error_model = "NotReady" if path == "/readyz" else "ErrorResponse"
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": f"#/components/schemas/{error_model}"
                }, (method, path, status)
    # Invalid requests are answered 400 with an ErrorResponse, never FastAPI's 422 HTTPValidationError.
    assert "HTTPValidationError" not in json.dumps(openapi)
    streamed = openapi["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    chunk = {"$ref": "#/components/schemas/ChatCompletionChunk"}
    assert event_data_schema(streamed["text/event-stream"]) == chunk
    assert "ChatCompletionChunk" in openapi["components"]["schemas"]


def test_files_jobs_events_checkpoints_and_errors_validate(client, auth, openapi, database_url):
    file_id = upload_file(client, auth, CHAT_LINES)
    jobs = "/v1/fine_tuning/jobs"
    assert_documented(
        openapi, client.get(f"/v1/files/{file_id}", headers=auth), "get", "/v1/files/{file_id}", FileObject
    )
    files = assert_documented(openapi, client.get("/v1/files", headers=auth), "get", "/v1/files", FileList)
    assert files["data"] and files["data"][0]["id"] == file_id

    body = {"model": "tiny-phi3", "training_file": file_id, "suffix": "ck", "metadata": {"team": "a"}}
    body["training_config"] = {"save_steps": 2, "learning_rate": 1e-5}
    created = client.post(jobs, json=body, headers=auth)
    job = assert_documented(openapi, created, "post", jobs, JobCreateResponse)  # the job, or an estimate
    job_id = job["id"]
    _, attempt = claim(client, job_id)
    metrics = {"step": 2, "total_steps": 4, "epoch": 1, "train_loss": 2.5, "learning_rate": 1e-5}
    client.post(
        f"/internal/v1/jobs/{job_id}/events",
        json={"events": [{"type": "metrics", "message": "Step 2/4", "data": metrics}]},
        headers=attempt,
    )
    store_checkpoint(client, job_id, attempt, 2, tiny_archive())
    paused = client.post(f"{jobs}/{job_id}/pause", headers=auth)
    assert_documented(openapi, paused, "post", jobs + "/{fine_tuning_job_id}/pause", FineTuningJob)
    resumed = client.post(f"{jobs}/{job_id}/resume", headers=auth)
    assert_documented(openapi, resumed, "post", jobs + "/{fine_tuning_job_id}/resume", FineTuningJob)
    running = assert_documented(
        openapi,
        client.get(f"{jobs}/{job_id}", headers=auth),
        "get",
        jobs + "/{fine_tuning_job_id}",
        FineTuningJob,
    )
    listed = assert_documented(openapi, client.get(jobs, headers=auth), "get", jobs, JobList)
    events = assert_documented(
        openapi,
        client.get(f"{jobs}/{job_id}/events", headers=auth),
        "get",
        jobs + "/{fine_tuning_job_id}/events",
        JobEventList,
    )
    assert {"message", "metrics"} <= {event["type"] for event in events["data"]}
    checkpoint_page = assert_documented(
        openapi,
        client.get(f"{jobs}/{job_id}/checkpoints", headers=auth),
        "get",
        jobs + "/{fine_tuning_job_id}/checkpoints",
        JobCheckpointList,
    )
    assert len(checkpoint_page["data"]) == 1

    with session_scope(database_url) as session:
        job_row = session.query(Job).filter_by(id=job_id).one()
        assert_unchanged(running, job_object(job_row))
        assert_unchanged(listed["data"][0], job_object(job_row))
        event_rows = session.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.seq.desc()).all()
        for event, row in zip(events["data"], event_rows, strict=True):
            assert_unchanged(event, event_object(row))
        checkpoint_row = session.query(Checkpoint).filter_by(job_id=job_id).one()
        assert_unchanged(checkpoint_page["data"][0], checkpoint_object(checkpoint_row))
    assert list(running) == list(FineTuningJob.model_fields)
    assert list(events["data"][0]) == list(FineTuningJobEvent.model_fields)
    assert list(checkpoint_page["data"][0]) == list(JobCheckpoint.model_fields)

    client.post(
        f"/internal/v1/jobs/{job_id}/complete",
        json={"status": "failed", "error": {"message": "CUDA out of memory"}},
        headers=attempt,
    )
    failed = assert_documented(
        openapi,
        client.get(f"{jobs}/{job_id}", headers=auth),
        "get",
        jobs + "/{fine_tuning_job_id}",
        FineTuningJob,
    )
    assert failed["error"] == {"code": "training_failed", "message": "CUDA out of memory", "param": None}

    errors = [
        (
            "post",
            jobs + "/{fine_tuning_job_id}/cancel",
            client.post(f"{jobs}/{job_id}/cancel", headers=auth),
            409,
        ),
        ("get", jobs + "/{fine_tuning_job_id}", client.get(f"{jobs}/ftjob-nope", headers=auth), 404),
        ("get", jobs, client.get(f"{jobs}?limit=0", headers=auth), 400),
        ("post", jobs, client.post(jobs, json={**body, "model": ""}, headers=auth), 400),
        ("get", "/v1/files", client.get("/v1/files"), 401),
    ]
    for method, path, response, status in errors:
        assert response.status_code == status, response.text
        error = assert_documented(openapi, response, method, path, ErrorResponse)
        assert list(error["error"]) == ["message", "type", "param", "code"]
    invalid = client.post(
        "/v1/files",
        files={"file": ("bad.jsonl", b'{"nope": 1}\n', "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    assert invalid.status_code == 422
    assert (
        list(assert_documented(openapi, invalid, "post", "/v1/files", ErrorResponse)["error"])[-1]
        == "details"
    )

    file_two = upload_file(client, auth, CHAT_LINES, name="other.jsonl")
    deleted = client.delete(f"/v1/files/{file_two}", headers=auth)
    assert assert_documented(openapi, deleted, "delete", "/v1/files/{file_id}", FileDeleted) == {
        "id": file_two,
        "object": "file",
        "deleted": True,
    }


def test_models_validate_and_keep_their_keys(client, auth, openapi, settings, database_url):
    job_id = succeeded_job(client, auth)

    models = assert_documented(
        openapi, client.get("/v1/models", headers=auth), "get", "/v1/models", ModelList
    )
    with session_scope(database_url) as session:
        row = session.query(Job).filter_by(id=job_id).one()
        tuned = {
            "id": row.fine_tuned_model,
            "object": "model",
            "created": row.finished_at,
            "owned_by": row.tenant_id,
            "parent": row.model,
            "fine_tuning_job": job_id,
        }
    base = {"id": "tiny-phi3", "object": "model", "created": SERVER_START, "owned_by": "phitune"}
    assert models == {"object": "list", "data": [as_json(base), as_json(tuned)]}
    assert "parent" not in models["data"][0]  # base models have no parent/fine_tuning_job keys, not nulls
    path = "/v1/models/{model_id}"
    one = assert_documented(
        openapi, client.get(f"/v1/models/{tuned['id']}", headers=auth), "get", path, Model
    )
    assert_unchanged(one, tuned)
    assert_unchanged(
        assert_documented(openapi, client.get("/v1/models/tiny-phi3", headers=auth), "get", path, Model), base
    )
    forbidden = client.delete("/v1/models/tiny-phi3", headers=auth)
    assert forbidden.status_code == 403
    assert_documented(openapi, forbidden, "delete", path, ErrorResponse)
    deleted = assert_documented(
        openapi, client.delete(f"/v1/models/{tuned['id']}", headers=auth), "delete", path, ModelDeleted
    )
    assert deleted == {"id": tuned["id"], "object": "model", "deleted": True}
    missing = client.get(f"/v1/models/{tuned['id']}", headers=auth)
    assert missing.status_code == 404
    assert_documented(openapi, missing, "get", path, ErrorResponse)


def test_chat_completions_validate(client, auth, openapi, inference):
    path = "/v1/chat/completions"
    chat = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "What is 2 plus 2?"}]}
    completion = assert_documented(
        openapi, client.post(path, json=chat, headers=auth), "post", path, ChatCompletion
    )
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": "4.", "refusal": None}
    assert completion["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert list(completion) == list(ChatCompletion.model_fields)

    for options in ({}, {"stream_options": {"include_usage": True}}):
        streamed = client.post(path, json={**chat, "stream": True, **options}, headers=auth)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        frames = [line[6:] for line in streamed.text.split("\n") if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        chunks = [
            assert_documented(
                openapi,
                streamed,
                "post",
                path,
                ChatCompletionChunk,
                media_type="text/event-stream",
                body=json.loads(frame),
            )
            for frame in frames[:-1]
        ]
        text = "".join(
            chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
        )
        assert text == "4."
        assert ("usage" in chunks[-1]) == bool(options)

    response = client.post(path, json={**chat, "model": "ft:nope"}, headers=auth)
    assert response.status_code == 404
    assert_documented(openapi, response, "post", path, ErrorResponse)


def test_health_routes_validate(client, openapi):
    assert assert_documented(openapi, client.get("/healthz"), "get", "/healthz", Health) == {"status": "ok"}
    assert assert_documented(openapi, client.get("/readyz"), "get", "/readyz", Ready) == {"status": "ready"}


def test_unready_readyz_validates(settings, openapi):
    settings = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(settings)) as unready:
        response = unready.get("/readyz")
    assert response.status_code == 503
    assert set(assert_documented(openapi, response, "get", "/readyz", NotReady)["failures"]) == {"broker"}
