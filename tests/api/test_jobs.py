"""The jobs API on a real database: validation, defaults, tenancy, pagination, cancel, events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.utils import CHAT_LINES, upload_file


@pytest.fixture
def training_file(client: TestClient, auth: dict[str, str]) -> str:
    return upload_file(client, auth, CHAT_LINES)


def create(client: TestClient, auth: dict[str, str], **body):
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-phi3", **body}, headers=auth)


def assert_error(response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_create_fills_documented_defaults(client, auth, training_file):
    response = create(client, auth, training_file=training_file, suffix="bot", metadata={"team": "search"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "queued" and job["fine_tuned_model"] is None and job["error"] is None
    assert job["training_config"]["learning_rate"] == 2e-4
    assert job["training_config"]["num_train_epochs"] == 3
    recipe_defaults = {
        "r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
        "target_modules": "all-linear", "modules_to_save": None,
    }  # fmt: skip
    assert {key: job["peft_config"][key] for key in recipe_defaults} == recipe_defaults
    assert job["hyperparameters"] == {"n_epochs": 3.0, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": None, "percent": 0.0}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json() == job


def test_hyperparameters_shorthand_maps_onto_training_config(client, auth, training_file):
    job = create(
        client,
        auth,
        training_file=training_file,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
    ).json()
    config = job["training_config"]
    assert (config["num_train_epochs"], config["per_device_train_batch_size"]) == (2, 8)
    assert config["learning_rate"] == pytest.approx(1e-4)

    via_method = create(
        client,
        auth,
        training_file=training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}},
    ).json()
    assert via_method["training_config"]["num_train_epochs"] == 5


def test_shorthand_conflicting_with_training_config_is_400(client, auth, training_file):
    response = create(
        client,
        auth,
        training_file=training_file,
        hyperparameters={"n_epochs": 2},
        training_config={"num_train_epochs": 3},
    )
    assert_error(response, 400, param="hyperparameters.n_epochs", code="conflicting_parameters")
    agreeing = create(
        client,
        auth,
        training_file=training_file,
        hyperparameters={"n_epochs": 3},
        training_config={"num_train_epochs": 3},
    )
    assert agreeing.status_code == 200
    seeds = create(client, auth, training_file=training_file, seed=1, training_config={"seed": 2})
    assert_error(seeds, 400, param="seed", code="conflicting_parameters")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_config": {"learning_rte": 1e-4}}, "training_config.learning_rte"),
        ({"peft_config": {"rank": 8}}, "peft_config.rank"),
        ({"peft_config": {"r": 0}}, "peft_config.r"),
        ({"peft_config": {"r": -4}}, "peft_config.r"),
        ({"training_config": {"learning_rate": -1e-4}}, "training_config.learning_rate"),
        ({"peft_config": {"lora_dropout": 1.0}}, "peft_config.lora_dropout"),
        ({"peft_config": {"lora_dropout": -0.1}}, "peft_config.lora_dropout"),
        ({"training_config": {"max_steps": 0}}, "training_config"),
        ({"suffix": "has spaces"}, "suffix"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_configs_are_400_naming_the_field(client, auth, training_file, body, param):
    error = assert_error(create(client, auth, training_file=training_file, **body), 400, param=param)
    assert param.split(".")[-1] in error["message"] or param == "training_config"


def test_unknown_model_is_model_not_available(client, auth, training_file):
    error = assert_error(
        create(client, auth, training_file=training_file, model="gpt-4o"),
        400,
        param="model",
        code="model_not_available",
    )
    assert "tiny-phi3" in error["message"]


def test_missing_or_foreign_files_are_404(client, auth, other_auth, training_file):
    assert_error(
        create(client, auth, training_file="file-nope"), 404, param="training_file", code="file_not_found"
    )
    assert_error(create(client, other_auth, training_file=training_file), 404, param="training_file")
    assert_error(
        create(client, auth, training_file=training_file, validation_file="file-nope"),
        404,
        param="validation_file",
    )


def test_auth_is_required_and_tenants_are_isolated(client, auth, other_auth, training_file):
    job_id = create(client, auth, training_file=training_file).json()["id"]
    assert_error(client.get("/v1/fine_tuning/jobs"), 401)
    assert_error(client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer pt-wrong"}), 401)
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=other_auth), 404, code="job_not_found")
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=other_auth), 404)
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=other_auth), 404)
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=other_auth), 404)
    assert client.get("/v1/fine_tuning/jobs", headers=other_auth).json()["data"] == []


def test_list_is_newest_first_with_stable_cursors(client, auth, training_file):
    ids = [create(client, auth, training_file=training_file).json()["id"] for _ in range(5)]
    first = client.get("/v1/fine_tuning/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    create(client, auth, training_file=training_file)  # a new job must not shift the next page
    second = client.get(f"/v1/fine_tuning/jobs?limit=2&after={first['last_id']}", headers=auth).json()
    assert [j["id"] for j in second["data"]] == ids[::-1][2:4]
    last = client.get(f"/v1/fine_tuning/jobs?limit=2&after={second['last_id']}", headers=auth).json()
    assert [j["id"] for j in last["data"]] == ids[:1] and not last["has_more"]
    assert_error(client.get("/v1/fine_tuning/jobs?limit=0", headers=auth), 400, param="limit")
    assert_error(client.get("/v1/fine_tuning/jobs?limit=101", headers=auth), 400, param="limit")


def test_list_filters_by_metadata(client, auth, training_file):
    search = create(client, auth, training_file=training_file, metadata={"team": "search"}).json()["id"]
    create(client, auth, training_file=training_file, metadata={"team": "ads"})
    page = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "search"}, headers=auth).json()
    assert [j["id"] for j in page["data"]] == [search]


def test_cancel_queued_job_at_once_and_idempotently(client, auth, training_file):
    job_id = create(client, auth, training_file=training_file).json()["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert_error(
        client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=auth), 409, code="adapter_not_ready"
    )


def test_the_sdk_does_not_retry_a_state_conflict(client, auth, training_file):
    """The OpenAI SDK retries a 409 twice unless the answer says `x-should-retry: false`: a job that is not
    paused is refused once, at once, not three times over some seconds."""
    job_id = create(client, auth, training_file=training_file).json()["id"]
    sent: list[object] = []
    client.event_hooks = {"request": [sent.append], "response": []}
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client
    )
    with pytest.raises(openai.ConflictError) as refused:
        sdk.fine_tuning.jobs.resume(job_id)
    assert (refused.value.code, len(sent)) == ("job_not_paused", 1)


def test_a_concurrent_write_409_stays_retryable_for_the_sdk(settings, auth):
    """The 409 of a write that lost a race (an IntegrityError: two creates with one Idempotency-Key, say) is
    worth retrying, and the retry finds what the winner wrote: it does not say `x-should-retry: false`, as a
    state conflict does, so the SDK retries it."""
    from sqlalchemy.exc import IntegrityError

    app = create_app(settings)
    calls: list[int] = []

    def race() -> None:
        calls.append(1)
        raise IntegrityError("INSERT INTO jobs ...", {}, Exception("UNIQUE constraint failed"))

    app.add_api_route("/v1/race", race, methods=["POST"])
    with TestClient(app) as client:
        response = client.post("/v1/race", headers=auth)
        assert_error(response, 409, code="conflict")
        assert "x-should-retry" not in response.headers
        sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client
        )
        with pytest.raises(openai.ConflictError):
            sdk.with_options(max_retries=1).post("/race", cast_to=dict)
    assert len(calls) == 1 + 2  # the plain request, then the SDK's first try and its one retry


def test_events_newest_first_by_default_oldest_first_on_request_and_stream_ends_with_the_job(
    client, auth, training_file
):
    job_id = create(client, auth, training_file=training_file).json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    events = client.get(url, params={"order": "asc"}, headers=auth).json()
    messages = [e["message"] for e in events["data"]]
    assert len(messages) >= 2
    assert messages[0].startswith("Created fine-tuning job") and "cancelled" in messages[-1]
    assert all(e["object"] == "fine_tuning.job.event" for e in events["data"])
    after_first = client.get(url, params={"order": "asc", "after": events["first_id"]}, headers=auth)
    assert [e["id"] for e in after_first.json()["data"]] == [e["id"] for e in events["data"][1:]]

    # As OpenAI lists them: newest first, and `after` pages on towards the oldest.
    newest = client.get(url, headers=auth).json()
    assert [e["id"] for e in newest["data"]] == [e["id"] for e in reversed(events["data"])]
    first_page = client.get(url, params={"limit": 1}, headers=auth).json()
    assert first_page["has_more"] and first_page["data"][0]["id"] == events["last_id"]
    second_page = client.get(url, params={"limit": 1, "after": first_page["last_id"]}, headers=auth).json()
    assert second_page["data"][0]["id"] == events["data"][-2]["id"]
    assert_error(client.get(url, params={"order": "sideways"}, headers=auth), 400, param="order")

    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=auth) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    streamed = [json.loads(line[6:]) for line in body.splitlines() if line.startswith('data: {"')]
    assert [e["id"] for e in streamed] == [e["id"] for e in events["data"]]
    assert body.rstrip().endswith("data: {}")


def test_another_tenants_id_is_no_cursor(client, auth, other_auth, training_file):
    job_id = create(client, auth, training_file=training_file).json()["id"]
    response = client.get(f"/v1/fine_tuning/jobs?after={job_id}", headers=other_auth)
    assert_error(response, 400, param="after", code="invalid_cursor")


def test_a_file_an_unfinished_job_needs_cannot_be_deleted(client, auth, training_file):
    job_id = create(client, auth, training_file=training_file).json()["id"]
    assert_error(client.delete(f"/v1/files/{training_file}", headers=auth), 409, code="file_in_use")
    # A paused job downloads its file again when it resumes.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    assert_error(client.delete(f"/v1/files/{training_file}", headers=auth), 409, code="file_in_use")
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert client.delete(f"/v1/files/{training_file}", headers=auth).status_code == 200


def test_best_model_selection_needs_a_validation_file(client, auth, training_file):
    response = create(
        client, auth, training_file=training_file, training_config={"load_best_model_at_end": True}
    )
    assert_error(
        response, 400, param="training_config.load_best_model_at_end", code="validation_file_required"
    )
    ok = create(
        client,
        auth,
        training_file=training_file,
        validation_file=training_file,
        training_config={"load_best_model_at_end": True},
    )
    assert ok.status_code == 200 and ok.json()["training_config"]["load_best_model_at_end"] is True


@contextmanager
def client_for_model(settings, tmp_path, model: str, config_json: str | None) -> Iterator[TestClient]:
    """An API whose only base model is a directory holding just `config_json` as config.json (all the API
    reads at creation), or nothing at all when it is None."""
    model_dir = tmp_path / model
    if config_json is not None:
        model_dir.mkdir()
        (model_dir / "config.json").write_text(config_json)
    with TestClient(
        create_app(settings.model_copy(update={"base_models": {model: str(model_dir)}}))
    ) as client:
        yield client


@pytest.fixture
def gqa_client(settings, tmp_path):
    """An API whose base model uses grouped-query attention."""
    config = {
        "model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "max_position_embeddings": 1024,
    }  # fmt: skip
    with client_for_model(settings, tmp_path, "gqa-phi3", json.dumps(config)) as client:
        yield client


@pytest.mark.parametrize(
    ("peft_config", "param"),
    [
        ({"backend": "loralib"}, "peft_config.qkv_slices"),
        ({"backend": "loralib", "qkv_slices": ["q", "v"]}, "peft_config.qkv_slices"),
        ({"target_modules": ["q_proj", "v_proj"]}, "peft_config.target_modules"),
    ],
)
def test_lora_settings_the_model_cannot_take_are_400_at_creation(gqa_client, auth, peft_config, param):
    file_id = upload_file(gqa_client, auth, CHAT_LINES)
    response = gqa_client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "gqa-phi3", "training_file": file_id, "peft_config": peft_config},
        headers=auth,
    )
    assert_error(response, 400, param=param, code="incompatible_model")
    fits = {"backend": "loralib", "target_modules": ["o_proj", "down_proj"]}
    response = gqa_client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "gqa-phi3", "training_file": file_id, "peft_config": fits},
        headers=auth,
    )
    assert response.status_code == 200, response.text


def test_qkv_slices_need_the_loralib_backend(client, auth, training_file):
    error = assert_error(
        create(client, auth, training_file=training_file, peft_config={"qkv_slices": ["q"]}), 400
    )
    assert "qkv_slices" in error["message"]


@pytest.mark.parametrize(
    ("peft_config", "param"),
    [
        ({"target_modules": ["qkv_proj", "lm_head"]}, "peft_config.target_modules"),
        ({"target_modules": ["model.embed_tokens"]}, "peft_config.target_modules"),
        ({"modules_to_save": ["lm_head"]}, "peft_config.modules_to_save"),
    ],
)
def test_layers_neither_trainer_nor_server_can_adapt_are_400(client, auth, training_file, peft_config, param):
    response = create(client, auth, training_file=training_file, peft_config=peft_config)
    assert_error(response, 400, param=param)


def test_max_seq_length_is_capped_by_the_model_context(gqa_client, auth):
    file_id = upload_file(gqa_client, auth, CHAT_LINES)
    body = {"model": "gqa-phi3", "training_file": file_id}
    job = gqa_client.post("/v1/fine_tuning/jobs", json=body, headers=auth).json()
    assert job["training_config"]["max_seq_length"] == 1024  # the default 2048, fitted to the context
    too_long = {**body, "training_config": {"max_seq_length": 2048}}
    response = gqa_client.post("/v1/fine_tuning/jobs", json=too_long, headers=auth)
    error = assert_error(response, 400, param="training_config.max_seq_length", code="incompatible_model")
    assert "context of 1024 tokens" in error["message"]


def test_a_configured_model_the_api_cannot_read_is_503_not_unchecked(settings, auth, tmp_path):
    with client_for_model(settings, tmp_path, "phi-3-mini", None) as client:
        file_id = upload_file(client, auth, CHAT_LINES)
        body = {"model": "phi-3-mini", "training_file": file_id}
        response = client.post("/v1/fine_tuning/jobs", json=body, headers=auth)
        error = assert_error(response, 503, param="model", code="model_config_unavailable")
        assert "mount the model directory into the API read-only" in error["message"]
        assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []  # nothing was created


@pytest.mark.parametrize(
    ("content", "status"),
    [
        ("[1, 2]", 503),  # JSON, but no object
        ("not json", 503),
        ('{"model_type": "phi3", "num_attention_heads": 4, "max_position_embeddings": "4k"}', 200),  # no cap
        ('{"model_type": "phi3"}', 503),  # loralib must know the heads
    ],
)
def test_an_odd_model_config_is_never_a_500(settings, auth, tmp_path, content, status):
    with client_for_model(settings, tmp_path, "odd", content) as client:
        file_id = upload_file(client, auth, CHAT_LINES)
        body = {"model": "odd", "training_file": file_id, "peft_config": {"backend": "loralib"}}
        response = client.post("/v1/fine_tuning/jobs", json=body, headers=auth)
        assert response.status_code == status, response.text
        if status == 503:
            assert response.json()["error"]["code"] == "model_config_unavailable"


def test_trained_biases_the_server_cannot_apply_are_400(settings, auth, tmp_path):
    config = json.dumps({"model_type": "llama", "attention_bias": True})
    with client_for_model(settings, tmp_path, "biased", config) as client:
        file_id = upload_file(client, auth, CHAT_LINES)
        body = {"model": "biased", "training_file": file_id, "peft_config": {"bias": "all"}}
        response = client.post("/v1/fine_tuning/jobs", json=body, headers=auth)
        assert_error(response, 400, param="peft_config.bias", code="incompatible_model")
