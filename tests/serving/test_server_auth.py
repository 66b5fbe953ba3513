"""Who may call the inference server, and with what it calls the API, over real HTTP: only the inference
token opens its routes (/healthz excepted); a real `phitune api` process calls it with that token on the chat
path and on model deletion, and the inference server fetches the adapter from that API with the serving
token."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from phitune.launch import free_port, run_phitune, running
from tests.serving.conftest import (
    BASE_MODEL,
    INFERENCE_TOKEN,
    SERVING_TOKEN,
    InferenceServer,
    generate_body,
)

WORKER_TOKEN = "serving-auth-worker-token"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {SERVING_TOKEN}"},  # the inference server's own credential, at the API
        {"Authorization": f"Bearer {INFERENCE_TOKEN}x"},
        {"Authorization": f"Basic {INFERENCE_TOKEN}"},
        {"Authorization": b"Bearer \xb2"},
    ],
)
def test_every_route_but_health_needs_the_inference_token(server: InferenceServer, headers: dict) -> None:
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        refused = [
            client.post("/generate", json=generate_body(None, "Hi", max_tokens=1)),
            client.post("/generate", content=b"{not json"),  # refused before the body is read
            client.delete("/adapters/ftjob-plain"),
            client.get("/stats"),
            client.get("/no-such-path"),  # not even which paths exist
            client.get("/openapi.json"),
        ]
        for response in refused:
            assert response.status_code == 401, (response.request.url, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/healthz").json() == {"status": "ok"}


def test_the_inference_token_opens_every_route(server: InferenceServer) -> None:
    with server.client() as client:
        generated = client.post("/generate", json=generate_body(None, "Hi", max_tokens=1))
        assert generated.status_code == 200 and generated.json()["completion_tokens"] == 1
        assert client.get("/stats").status_code == 200
        assert client.delete("/adapters/ftjob-never-loaded").json() == {
            "id": "ftjob-never-loaded",
            "evicted": False,
        }


@pytest.fixture(scope="module")
def api_and_inference(
    start_server: Callable[..., InferenceServer],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, str], InferenceServer]]:
    """A `phitune api` process and an inference server that know each other's credentials: the API's URL,
    a tenant's Authorization header, the inference server."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    inference = start_server(8, api_url)  # fetches adapters from the API with SERVING_TOKEN
    env = api_env(tmp_path_factory.mktemp("api-data"), tiny_model_dir, inference.url)
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "chat", env=env).strip().splitlines()[-1]
    with running(["api", "--port", str(port)], api_url, env=env):
        yield api_url, {"Authorization": f"Bearer {key}"}, inference


def api_env(data_dir: Path, tiny_model_dir: Path, inference_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")}
    return env | {
        "HF_HUB_OFFLINE": "1",
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_BASE_MODELS": json.dumps({BASE_MODEL: str(tiny_model_dir)}),
        "PHITUNE_BROKER_URL": "memory://",
        "PHITUNE_INFERENCE_URL": inference_url,
        "PHITUNE_WORKER_TOKEN": WORKER_TOKEN,
        "PHITUNE_SERVING_TOKEN": SERVING_TOKEN,
        "PHITUNE_INFERENCE_TOKEN": INFERENCE_TOKEN,
        **{f"PHITUNE_{name.upper()}": value for name, value in settings.items()},
    }


def fine_tuned_model(client: httpx.Client, auth: dict[str, str], archive: Path) -> tuple[str, str]:
    """A succeeded job whose adapter is `archive`, made through the API as a worker makes one: (job id,
    model id)."""
    dataset = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]}
    )
    file_id = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", dataset.encode())},
        data={"purpose": "fine-tune"},
        headers=auth,
    ).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file_id}, headers=auth
    ).json()["id"]
    claimed = client.post(
        f"/internal/v1/jobs/{job_id}/claim", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}
    )
    attempt = {"Authorization": f"Bearer {claimed.json()['token']}"}
    assert client.put(
        f"/internal/v1/jobs/{job_id}/adapter", content=archive.read_bytes(), headers=attempt
    ).is_success
    assert client.post(
        f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt
    ).is_success
    return job_id, client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["fine_tuned_model"]


def test_the_api_calls_the_inference_server_which_fetches_the_adapter_from_the_api(
    api_and_inference: tuple[str, dict[str, str], InferenceServer], archives: dict[str, Path]
) -> None:
    api_url, auth, inference = api_and_inference
    with httpx.Client(base_url=api_url, timeout=120) as client:
        job_id, model = fine_tuned_model(client, auth, archives["ftjob-plain"])
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        answer = client.post("/v1/chat/completions", json=chat, headers=auth)
        assert answer.status_code == 200, answer.text
        streamed = client.post("/v1/chat/completions", json=chat | {"stream": True}, headers=auth)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert job_id in inference.stats()["loaded_adapters"]  # downloaded with the serving token
        assert client.delete(f"/v1/models/{model}", headers=auth).status_code == 200
        assert job_id not in inference.stats()["loaded_adapters"]  # evicted by the API, with its token


def test_an_api_with_the_wrong_inference_token_answers_503_not_401(
    api_and_inference: tuple[str, dict[str, str], InferenceServer],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """The tenant's key was fine: the refusal is the deployment's problem, not an authentication error."""
    _, _, inference = api_and_inference
    port = free_port()
    env = api_env(tmp_path, tiny_model_dir, inference.url, inference_token="not-the-inference-token")
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "chat", env=env).strip().splitlines()[-1]
    with running(["api", "--port", str(port)], f"http://127.0.0.1:{port}", env=env):
        chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for stream in (False, True):
            answer = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=chat | {"stream": stream},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "inference_unauthorized"
