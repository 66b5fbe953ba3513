"""/v1/models and the validation of /v1/chat/completions on a real database (no inference server needed)."""

from __future__ import annotations

import pytest

from tests.api.test_internal import SERVING, succeeded_job, tiny_archive
from tests.api.test_jobs import assert_error


@pytest.fixture
def fine_tuned_model(client, auth) -> str:
    """A succeeded job's model id, reached through the worker routes as a real worker would."""
    job_id = succeeded_job(client, auth)
    return client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["fine_tuned_model"]


def test_models_lists_base_and_own_fine_tuned_models(client, auth, other_auth, fine_tuned_model):
    models = client.get("/v1/models", headers=auth).json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids == ["tiny-phi3", fine_tuned_model]
    tuned = client.get(f"/v1/models/{fine_tuned_model}", headers=auth).json()
    assert tuned["object"] == "model" and tuned["parent"] == "tiny-phi3"
    assert client.get("/v1/models/tiny-phi3", headers=auth).json()["owned_by"] == "phitune"
    assert [m["id"] for m in client.get("/v1/models", headers=other_auth).json()["data"]] == ["tiny-phi3"]
    assert_error(
        client.get(f"/v1/models/{fine_tuned_model}", headers=other_auth), 404, code="model_not_found"
    )


def test_deleted_model_disappears_and_cannot_be_called(client, auth, other_auth, fine_tuned_model):
    assert_error(
        client.delete(f"/v1/models/{fine_tuned_model}", headers=other_auth), 404, code="model_not_found"
    )
    assert_error(client.delete("/v1/models/tiny-phi3", headers=auth), 403, code="model_not_deletable")
    deleted = client.delete(f"/v1/models/{fine_tuned_model}", headers=auth)
    assert deleted.status_code == 200 and deleted.json() == {
        "id": fine_tuned_model,
        "object": "model",
        "deleted": True,
    }
    assert [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]] == ["tiny-phi3"]
    assert_error(client.get(f"/v1/models/{fine_tuned_model}", headers=auth), 404)
    chat = {"model": fine_tuned_model, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=chat, headers=auth), 404, code="model_not_found")
    job_id = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"][0]["id"]
    assert client.get(f"/internal/v1/adapters/{job_id}", headers=SERVING).status_code == 404


def test_inference_server_fetches_only_servable_adapters(client, auth, fine_tuned_model):
    job_id = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"][0]["id"]
    assert client.get(f"/internal/v1/adapters/{job_id}", headers=auth).status_code == 401
    fetched = client.get(f"/internal/v1/adapters/{job_id}", headers=SERVING)
    assert fetched.status_code == 200 and fetched.content == tiny_archive()


def test_unknown_or_foreign_models_are_404_never_the_base(client, auth, other_auth, fine_tuned_model):
    for model, headers in (("ft:tiny-phi3:nope:123", auth), (fine_tuned_model, other_auth), ("gpt-4o", auth)):
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        assert_error(
            client.post("/v1/chat/completions", json=chat, headers=headers), 404, code="model_not_found"
        )


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"tools": []}, "tools"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(client, auth, change, param):
    body = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "hi"}], **change}
    assert_error(client.post("/v1/chat/completions", json=body, headers=auth), 400, param=param)


def test_chat_needs_a_key(client):
    body = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 401)


def test_unreachable_inference_server_is_503(client, auth):
    body = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(client.post("/v1/chat/completions", json=body, headers=auth), 503)
    assert error["type"] == "server_error"
