"""Continuing from a previous model (`training_config.init_from`, or `model: "ft:…"`) on a real database: who
may continue from what, the settings the job takes, and the one adapter its worker may fetch."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.adapter_format import FORMAT_HEADER
from app.db import session_scope
from app.internal.contracts import ClaimReply
from app.main import create_app
from app.models import Job
from tests.api.test_checkpoints import store_checkpoint
from tests.api.test_internal import SERVING, WORKER, claim, tiny_archive
from tests.api.test_jobs import assert_error
from tests.utils import CHAT_LINES, upload_file
from worker.client import ApiClient
from worker.tasks import SourceModelGone, fetch_init_adapter, report_failure

SOURCE_LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj", "o_proj"]}


def create(client: TestClient, auth: dict[str, str], **body):
    training_file = upload_file(client, auth, CHAT_LINES)
    body = {"model": "tiny-phi3", "training_file": training_file, **body}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=auth)


def finish(client: TestClient, job_id: str, archive: bytes, fmt: str = "peft") -> None:
    """Run the job's attempt to success through the worker routes, as a worker would."""
    _, attempt = claim(client, job_id)
    url = f"/internal/v1/jobs/{job_id}/adapter"
    assert client.put(url, params={"format": fmt}, content=archive, headers=attempt).status_code == 200
    done = client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    assert done.status_code == 200, done.text


def trained(client: TestClient, auth: dict[str, str], fmt: str = "peft", **body) -> str:
    """The fine-tuned model of a job created with `body` that succeeded with an adapter in `fmt`."""
    job = create(client, auth, suffix="src", **body).json()
    finish(client, job["id"], tiny_archive(), fmt)
    return client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()["fine_tuned_model"]


@pytest.fixture
def source(client, auth) -> str:
    return trained(client, auth, peft_config=SOURCE_LORA)


def test_a_job_continues_from_a_fine_tuned_model_with_its_lora_settings(client, auth, source):
    response = create(
        client,
        auth,
        training_config={"init_from": source, "learning_rate": 1e-4},
        peft_config={"lora_dropout": 0.2, "r": 8},  # r as the source's: no conflict
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["model"] == "tiny-phi3" and job["training_config"]["init_from"] == source
    assert {key: job["peft_config"][key] for key in SOURCE_LORA} == {**SOURCE_LORA, "lora_alpha": 16.0}
    assert job["peft_config"]["lora_dropout"] == 0.2  # a setting of training, not of the adapter

    # OpenAI's form: the fine-tuned model as `model`. The job shows the base it trains over, and the source.
    openai_form = create(client, auth, model=source).json()
    assert openai_form["model"] == "tiny-phi3" and openai_form["training_config"]["init_from"] == source
    assert openai_form["peft_config"] == {**job["peft_config"], "lora_dropout": 0.05}
    both = create(client, auth, model=source, training_config={"init_from": source})
    assert both.status_code == 200, both.text
    other = trained(client, auth)
    conflicting = create(client, auth, model=source, training_config={"init_from": other})
    assert_error(conflicting, 400, param="training_config.init_from", code="conflicting_parameters")


def test_the_worker_fetches_exactly_the_source_adapter_and_ships_a_model_of_the_base(client, auth, source):
    job_id = create(client, auth, model=source, suffix="more").json()["id"]
    body, attempt = claim(client, job_id)
    assert body["model"] == "tiny-phi3" and body["training_config"]["init_from"] == source
    url = f"/internal/v1/jobs/{job_id}/init_from"
    fetched = client.get(url, headers=attempt)
    assert fetched.status_code == 200 and fetched.content == tiny_archive()
    assert fetched.headers[FORMAT_HEADER] == "peft"
    for other_credentials in (WORKER, SERVING, auth):
        assert client.get(url, headers=other_credentials).status_code == 401

    # A job continuing from nothing: its claim leaves the key out (for workers that predate it), and its
    # attempt may fetch no adapter at all.
    plain_id = create(client, auth).json()["id"]
    plain, plain_attempt = claim(client, plain_id)
    assert "init_from" not in plain["training_config"]
    assert_error(client.get(f"/internal/v1/jobs/{plain_id}/init_from", headers=plain_attempt), 404)
    assert client.get(url, headers=plain_attempt).status_code == 401  # another job's token

    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
    client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
    name = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["fine_tuned_model"]
    assert name.startswith("ft:tiny-phi3:more:")
    model = client.get(f"/v1/models/{name}", headers=auth).json()
    assert model["parent"] == "tiny-phi3" and model["fine_tuning_job"] == job_id


def test_a_loralib_adapter_is_fetched_in_its_own_format_and_takes_no_qlora(client, auth):
    loralib = {"backend": "loralib", "r": 4, "target_modules": ["o_proj"]}
    source = trained(client, auth, fmt="loralib", peft_config=loralib)
    job = create(client, auth, training_config={"init_from": source}).json()
    assert job["peft_config"]["backend"] == "loralib" and job["peft_config"]["r"] == 4
    _, attempt = claim(client, job["id"])
    fetched = client.get(f"/internal/v1/jobs/{job['id']}/init_from", headers=attempt)
    assert fetched.status_code == 200 and fetched.headers[FORMAT_HEADER] == "loralib"

    qlora = create(client, auth, model=source, peft_config={"quantization": "4bit"})
    error = assert_error(qlora, 400, param="peft_config", code="incompatible_init_from")
    assert "quantization" in error["message"] and "loralib" in error["message"]


@pytest.mark.parametrize(
    ("peft_config", "param"),
    [
        ({"r": 16}, "peft_config.r"),
        ({"lora_alpha": 32}, "peft_config.lora_alpha"),
        ({"target_modules": "all-linear"}, "peft_config.target_modules"),
        ({"backend": "loralib", "r": 8, "target_modules": ["qkv_proj", "o_proj"]}, "peft_config.backend"),
        ({"use_rslora": True}, "peft_config.use_rslora"),
    ],
)
def test_lora_settings_other_than_the_adapters_are_400(client, auth, source, peft_config, param):
    response = create(client, auth, training_config={"init_from": source}, peft_config=peft_config)
    error = assert_error(response, 400, param=param, code="incompatible_init_from")
    assert source in error["message"]


def test_a_source_trained_under_rules_since_tightened_is_400(client, auth, source, database_url):
    # A model trained before a LoRA setting was refused keeps that setting in its stored peft_config.
    with session_scope(database_url) as session:
        job = session.query(Job).filter_by(fine_tuned_model=source).one()
        job.peft_config = {**job.peft_config, "r": -1}
    response = create(client, auth, training_config={"init_from": source})
    error = assert_error(response, 400, param="training_config.init_from", code="incompatible_init_from")
    assert "no longer accepts" in error["message"]


def test_qlora_trains_on_over_a_plain_adapter(client, auth, source):
    response = create(client, auth, model=source, peft_config={"quantization": "4bit"})
    assert response.status_code == 200, response.text
    assert response.json()["peft_config"]["quantization"] == "4bit"
    assert response.json()["peft_config"]["r"] == 8


def test_unknown_foreign_or_deleted_sources_are_404_alike(client, auth, other_auth, source):
    deleted = trained(client, auth)
    assert client.delete(f"/v1/models/{deleted}", headers=auth).status_code == 200
    unknown = "ft:tiny-phi3:src:000000000000"
    for name, headers in ((unknown, auth), (source, other_auth), (deleted, auth)):
        via_config = create(client, headers, training_config={"init_from": name})
        error = assert_error(via_config, 404, param="training_config.init_from", code="model_not_found")
        assert error["message"] == f"The model '{name}' does not exist or you do not have access to it."
        assert_error(create(client, headers, model=name), 404, param="model", code="model_not_found")
    assert client.get("/v1/fine_tuning/jobs", headers=other_auth).json()["data"] == []
    assert_error(create(client, auth, model="gpt-4o"), 400, param="model", code="model_not_available")
    base = create(client, auth, training_config={"init_from": "tiny-phi3"})
    assert_error(base, 400, param="training_config.init_from", code="invalid_value")


def test_a_checkpoint_is_a_source_too(client, auth, settings):
    running = create(client, auth, suffix="src").json()["id"]
    _, attempt = claim(client, running)
    checkpoint = store_checkpoint(client, running, attempt, 2, b"checkpoint archive")
    name = checkpoint["fine_tuned_model_checkpoint"]
    assert name.endswith(":ckpt-step-2")
    job = create(client, auth, training_config={"init_from": name}).json()
    assert job["training_config"]["init_from"] == name and job["peft_config"]["r"] == 16
    _, continued = claim(client, job["id"])
    fetched = client.get(f"/internal/v1/jobs/{job['id']}/init_from", headers=continued)
    assert fetched.status_code == 200 and fetched.content == b"checkpoint archive"


def test_a_source_of_another_base_model_is_400(settings, auth, tmp_path: Path):
    config = {"model_type": "phi3", "num_attention_heads": 4, "max_position_embeddings": 512}
    models = {}
    for name in ("tiny-phi3", "other-phi3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        models[name] = str(tmp_path / name)
    with TestClient(create_app(settings.model_copy(update={"base_models": models}))) as client:
        source = trained(client, auth)
        response = create(client, auth, model="other-phi3", training_config={"init_from": source})
        error = assert_error(response, 400, param="training_config.init_from", code="incompatible_init_from")
        assert "'tiny-phi3'" in error["message"] and "'other-phi3'" in error["message"]
        assert create(client, auth, model=source).json()["model"] == "tiny-phi3"


def test_a_source_deleted_while_the_job_waits_fails_the_job_clearly(client, auth, source, tmp_path):
    job_id = create(client, auth, model=source).json()["id"]
    assert client.delete(f"/v1/models/{source}", headers=auth).status_code == 200
    body, headers = claim(client, job_id)
    error = assert_error(client.get(f"/internal/v1/jobs/{job_id}/init_from", headers=headers), 404)
    assert f"'{source}', which was deleted after the job was created" in error["message"]

    # What the worker does with that answer (worker.tasks), its requests served by this API: the attempt
    # fails the job, saying why.
    def through_the_api(request: httpx.Request) -> httpx.Response:
        answer = client.request(
            request.method, request.url.path, headers=request.headers.raw, content=request.content
        )
        return httpx.Response(answer.status_code, headers=answer.headers.raw, content=answer.content)

    api = ApiClient("http://testserver", "test-worker-token", transport=httpx.MockTransport(through_the_api))
    attempt = api.attempt(ClaimReply.model_validate(body))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(SourceModelGone) as gone:
        fetch_init_adapter(attempt, source, "peft", scratch)
    report_failure(attempt, f"{type(gone.value).__name__}: {gone.value}")
    api.close()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "failed" and source in job["error"]["message"]
    assert "was deleted after the job was created" in job["error"]["message"]
    assert list(scratch.iterdir()) == []  # nothing downloaded is left behind
