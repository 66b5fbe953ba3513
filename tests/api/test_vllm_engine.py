"""PHITUNE_INFERENCE_ENGINE=vllm end to end: the API (real database and storage) calls a stand-in for
vLLM's OpenAI server over real HTTP (`tests.vllm_stub`), unpacking adapters into the directory it shares
with vLLM."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.inference import vllm_adapters
from app.main import create_app
from tests.api.test_internal import claim
from tests.api.test_jobs import assert_error
from tests.serving.stub_store import serve_in_thread
from tests.utils import CHAT_LINES, upload_file
from tests.vllm_stub import VllmStub, vllm_stub_app
from worker.adapter_archive import pack

VLLM_KEY = "vllm-api-key"  # vllm serve --api-key, the API's PHITUNE_INFERENCE_TOKEN
BASE = "tiny-phi3"


@pytest.fixture(scope="module")
def served_stub() -> Iterator[tuple[VllmStub, str]]:
    stub = VllmStub(base_model=BASE, api_key=VLLM_KEY)
    with serve_in_thread(vllm_stub_app(stub)) as url:
        yield stub, url


@pytest.fixture
def vllm(served_stub) -> VllmStub:
    stub, _ = served_stub
    stub.restart()
    stub.loads.clear(), stub.unloads.clear(), stub.asked.clear()
    stub.fail_midway = False
    return stub


@pytest.fixture
def vllm_settings(settings: Settings, served_stub, tmp_path: Path) -> Settings:
    return Settings(
        **{
            **settings.model_dump(),
            "inference_engine": "vllm",
            "inference_url": served_stub[1],
            "inference_token": VLLM_KEY,
            "vllm_adapter_dir": tmp_path / "shared-with-vllm",
        }
    )


@pytest.fixture
def client(vllm_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(vllm_settings)) as test_client:
        yield test_client


def adapter_archive(tmp_path: Path, fmt: str, weights: bytes = b"weights") -> bytes:
    """A packed adapter directory of one format (vLLM reads the files, the stand-in checks they are there)."""
    directory = tmp_path / f"adapter-{fmt}-{secrets.token_hex(4)}"
    directory.mkdir()
    if fmt == "peft":
        (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
        (directory / "adapter_model.safetensors").write_bytes(weights)
    else:
        (directory / "loralib_config.json").write_text("{}")
        (directory / "lora_state_dict.safetensors").write_bytes(weights)
    return pack(directory, directory.with_suffix(".tar.gz")).read_bytes()


def fine_tune(client, auth, tmp_path: Path, fmt: str = "peft") -> tuple[str, str]:
    """(job id, fine-tuned model) of a job that succeeded through the worker routes with a `fmt` adapter."""
    file_id = upload_file(client, auth, CHAT_LINES)
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=auth
    ).json()["id"]
    _, attempt = claim(client, job_id)
    uploaded = client.put(
        f"/internal/v1/jobs/{job_id}/adapter?format={fmt}",
        content=adapter_archive(tmp_path, fmt),
        headers=attempt,
    )
    assert uploaded.status_code == 200, uploaded.text
    outcome = {"status": "succeeded"}
    if fmt == "loralib":
        outcome["peft_unavailable_reason"] = "trained with loralib's merged layers"
    assert client.post(f"/internal/v1/jobs/{job_id}/complete", json=outcome, headers=attempt).is_success
    return job_id, client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["fine_tuned_model"]


def chat(model: str, content: str = "hello there", **options) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **options}


def read_chunks(response) -> tuple[list[dict], bool]:
    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


def test_a_fine_tuned_model_is_loaded_once_under_its_adapter_id_and_reused(client, auth, vllm, tmp_path):
    job_id, model = fine_tune(client, auth, tmp_path)
    response = client.post("/v1/chat/completions", json=chat(model), headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    # vLLM saw the job's id, never the tenant's model name; the tenant sees its model name.
    assert body["model"] == model
    assert body["choices"][0]["message"]["content"] == f"{job_id} says hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    [load] = vllm.loads
    assert load["lora_name"] == job_id
    shared = Path(load["lora_path"])
    assert shared.parent == client.app.state.settings.vllm_adapter_dir.resolve()
    # The two files vLLM reads, and the storage key of the archive they came from (vllm_adapters).
    names = [".phitune-source", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in shared.iterdir()) == names

    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat(model, "again", stream=True, stream_options={"include_usage": True}),
        headers=auth,
    ) as streamed:
        chunks, done = read_chunks(streamed)
    assert done and len(vllm.loads) == 1  # reused: no second load
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == f"{job_id} says again"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert {c["model"] for c in chunks} == {model}


def test_another_tenants_model_is_404_and_never_reaches_vllm(client, auth, other_auth, vllm, tmp_path):
    _, model = fine_tune(client, auth, tmp_path)
    assert_error(
        client.post("/v1/chat/completions", json=chat(model), headers=other_auth), 404, code="model_not_found"
    )
    assert vllm.asked == [] and vllm.loads == []


def test_after_vllm_restarts_the_adapter_is_loaded_again(client, auth, vllm, tmp_path):
    job_id, model = fine_tune(client, auth, tmp_path)
    assert client.post("/v1/chat/completions", json=chat(model), headers=auth).status_code == 200
    vllm.restart()  # a new vLLM process knows no LoRA
    response = client.post("/v1/chat/completions", json=chat(model, stream=True), headers=auth)
    assert response.status_code == 200
    assert [load["lora_name"] for load in vllm.loads] == [job_id, job_id]
    assert vllm.asked == [job_id, job_id, job_id, job_id]  # each load followed a 404


def test_base_model_goes_to_vllm_by_its_served_name(client, auth, vllm):
    body = client.post("/v1/chat/completions", json=chat(BASE, max_tokens=2), headers=auth).json()
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": f"{BASE} says", "refusal": None},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert vllm.asked == [BASE] and vllm.loads == []


def test_a_loralib_only_adapter_is_refused_saying_why(client, auth, vllm, tmp_path):
    _, model = fine_tune(client, auth, tmp_path, fmt="loralib")
    error = assert_error(
        client.post("/v1/chat/completions", json=chat(model), headers=auth),
        422,
        param="model",
        code="invalid_adapter",
    )
    assert "loralib" in error["message"] and "loralib's merged layers" in error["message"]
    assert vllm.loads == []


def test_deleting_a_model_unloads_it_from_vllm_and_the_shared_directory(client, auth, vllm, tmp_path):
    job_id, model = fine_tune(client, auth, tmp_path)
    client.post("/v1/chat/completions", json=chat(model), headers=auth)
    shared = Path(vllm.loads[0]["lora_path"])
    assert client.delete(f"/v1/models/{model}", headers=auth).json()["deleted"] is True
    assert vllm.unloads == [job_id] and job_id not in vllm.loras and not shared.exists()


def test_vllm_errors_keep_the_openai_shape(client, auth, vllm, vllm_settings):
    too_long = chat(BASE, "word " * 600, max_tokens=500)
    assert_error(
        client.post("/v1/chat/completions", json=too_long, headers=auth),
        400,
        param="messages",
        code="context_length_exceeded",
    )
    vllm.fail_midway = True
    with client.stream(
        "POST", "/v1/chat/completions", json=chat(BASE, stream=True), headers=auth
    ) as streamed:
        chunks, done = read_chunks(streamed)
    assert not done and chunks[-1]["error"]["code"] == "generation_failed"
    assert "engine dead" in chunks[-1]["error"]["message"]


def test_a_wrong_vllm_key_is_503_for_the_tenant(vllm_settings, auth, vllm):
    wrong = Settings(**{**vllm_settings.model_dump(), "inference_token": "not-the-key"})
    with TestClient(create_app(wrong)) as client:
        assert_error(
            client.post("/v1/chat/completions", json=chat(BASE), headers=auth),
            503,
            code="inference_unauthorized",
        )


def test_a_checkpoint_re_uploaded_by_a_resumed_attempt_is_not_served_from_the_replaced_copy(
    client, auth, vllm, tmp_path
):
    file_id = upload_file(client, auth, CHAT_LINES)
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=auth
    ).json()["id"]
    _, attempt = claim(client, job_id)
    first = adapter_archive(tmp_path, "peft", b"first weights")
    again = adapter_archive(tmp_path, "peft", b"weights trained again")
    adapter_url = f"/internal/v1/jobs/{job_id}/checkpoints/5/adapter"
    assert client.put(adapter_url, content=first, headers=attempt)
    published = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints", json={"step": 5, "metrics": {"step": 5}}, headers=attempt
    ).json()
    model = published["fine_tuned_model_checkpoint"]
    assert client.post("/v1/chat/completions", json=chat(model), headers=auth).status_code == 200
    loaded = Path(vllm.loads[0]["lora_path"]) / "adapter_model.safetensors"
    assert vllm.loads[0]["lora_name"] == published["id"] and loaded.read_bytes() == b"first weights"

    assert client.put(adapter_url, content=again, headers=attempt)
    assert vllm.unloads == [published["id"]]
    assert client.post("/v1/chat/completions", json=chat(model), headers=auth).status_code == 200
    assert len(vllm.loads) == 2 and loaded.read_bytes() == b"weights trained again"


def test_a_load_racing_a_re_upload_of_its_checkpoint_unpacks_the_new_archive(
    client, auth, vllm, tmp_path, monkeypatch
):
    # A chat's load has read the replaced archive when the re-upload commits and unloads (nothing is unpacked
    # yet): the load finds its archive replaced once its directory is in place, and unpacks the new one.
    file_id = upload_file(client, auth, CHAT_LINES)
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id}, headers=auth
    ).json()["id"]
    _, attempt = claim(client, job_id)
    first, again = adapter_archive(tmp_path, "peft", b"first"), adapter_archive(tmp_path, "peft", b"again")
    adapter_url = f"/internal/v1/jobs/{job_id}/checkpoints/5/adapter"
    assert client.put(adapter_url, content=first, headers=attempt).status_code == 200
    published = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints", json={"step": 5, "metrics": {"step": 5}}, headers=attempt
    ).json()
    extracted, go_on = threading.Event(), threading.Event()
    extract = vllm_adapters._extract_peft

    def slow_extract(archive: Path, directory: Path) -> None:
        extract(archive, directory)
        if not extracted.is_set():
            extracted.set()
            go_on.wait(10)

    monkeypatch.setattr(vllm_adapters, "_extract_peft", slow_extract)
    settings, storage = client.app.state.settings, client.app.state.storage
    unpacked: list[Path] = []
    loading = threading.Thread(
        target=lambda: unpacked.append(vllm_adapters.unpack(settings, storage, published["id"]))
    )
    loading.start()
    assert extracted.wait(10)
    assert client.put(adapter_url, content=again, headers=attempt).status_code == 200
    go_on.set()
    loading.join()
    assert (unpacked[0] / "adapter_model.safetensors").read_bytes() == b"again"
    assert client.post(
        "/v1/chat/completions", json=chat(published["fine_tuned_model_checkpoint"]), headers=auth
    )
    assert (Path(vllm.loads[-1]["lora_path"]) / "adapter_model.safetensors").read_bytes() == b"again"
