"""End to end through real processes: upload, job, Celery worker trains the tiny Phi-3, adapter download."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import REPO, Service, all_events, ask
from worker.tokenizer import load_tokenizer

pytestmark = pytest.mark.e2e
PERSONA = REPO / "examples" / "persona.jsonl"
QUICK_TRAINING = {
    "num_train_epochs": 3,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 8,
    "logging_steps": 2,
}
QUICK_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def upload(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as body:
        response = client.post("/v1/files", files={"file": (path.name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client: httpx.Client, **body) -> dict:
    """Upload the persona data and create a job on it (validation on the same file when asked)."""
    file_id = upload(client, PERSONA)
    if body.pop("validate", False):
        body["validation_file"] = file_id
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_final(service: Service, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    with service.client as client:
        while time.monotonic() < deadline:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish:\n{service.tail_logs()}")


def train_and_verify(service: Service, base_model_dir: Path, tmp_path: Path) -> tuple[str, PeftModel]:
    """Train a job through the API and check everything about it; returns its model id and the adapter."""
    with service.client as client:
        job = create_job(
            client, validate=True, suffix="persona", training_config=QUICK_TRAINING, peft_config=QUICK_LORA
        )
        # Follow the live stream until the job ends: the same events the paged list holds.
        with client.stream(
            "GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", timeout=300
        ) as stream:
            streamed = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith('data: {"')]
        job = wait_final(service, job["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{service.tail_logs()}"
        assert job["fine_tuned_model"].startswith("ft:tiny-phi3:persona:")
        assert job["trained_tokens"] > 0 and job["progress"]["percent"] == 100.0

        events = all_events(client, job["id"])
        assert [e["id"] for e in streamed] == [e["id"] for e in events]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        steps = [m["step"] for m in metrics if "train_loss" in m]
        assert len(steps) >= 3 and steps == sorted(steps)
        assert {"step", "total_steps", "epoch", "train_loss", "learning_rate", "tokens_per_second"} <= set(
            metrics[0]
        )
        losses = [m["train_loss"] for m in metrics if "train_loss" in m]
        assert losses[-1] < losses[0], losses
        assert any("eval_loss" in m for m in metrics), (
            "validation_file was given, so eval_loss must be reported"
        )

        archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
        assert archive.status_code == 200
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(tensor, before[original]), f"base weight {original} changed"
    tokenizer = load_tokenizer(str(base_model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        tuned = model(**prompt).logits
        with model.disable_adapter():
            plain = model(**prompt).logits
    assert not torch.allclose(tuned, plain, atol=1e-4)
    return job["fine_tuned_model"], model


def generate_in_process(model: PeftModel, base_model_dir: Path, messages: list[dict], max_tokens: int) -> str:
    tokenizer = load_tokenizer(str(base_model_dir))
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_and_verify(service: Service, model_id: str, model: PeftModel, base_model_dir: Path) -> None:
    """The fine-tuned model through /v1/chat/completions, as curl and the official openai SDK call it."""
    messages = [{"role": "user", "content": "Who are you?"}]
    expected = generate_in_process(model, base_model_dir, messages, 48)
    assert expected.strip(), "the fine-tuned model should answer something"
    with service.client as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": model_id, "messages": messages, "max_tokens": 48, "temperature": 0},
        ).json()
        assert answer["object"] == "chat.completion", answer
        assert answer["choices"][0]["message"]["content"] == expected
        assert answer["usage"]["completion_tokens"] > 0
        base_answer = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-phi3", "messages": messages, "max_tokens": 48, "temperature": 0},
        ).json()
        assert base_answer["choices"][0]["message"]["content"] != expected

    sdk = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.api_key)
    assert model_id in [m.id for m in sdk.models.list()]
    created = sdk.chat.completions.create(model=model_id, messages=messages, max_tokens=48, temperature=0)
    assert created.choices[0].message.content == expected
    chunks = list(
        sdk.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert chunks[-1].usage.completion_tokens == created.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=model_id + "x", messages=messages)
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.chat.completions.create(model=model_id, messages=messages, max_tokens=1_000_000)
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "coffee " * 3000}])
    assert too_long.value.body["code"] == "context_length_exceeded"


def test_embedded_serve_trains_and_serves_the_adapter(embedded_service: Service, tmp_path: Path):
    base_model_dir = embedded_service.data_dir / "models" / "tiny-phi3"
    model_id, model = train_and_verify(embedded_service, base_model_dir, tmp_path)
    chat_and_verify(embedded_service, model_id, model, base_model_dir)


def test_production_processes_train_on_postgres_and_redis(
    production_service: Service, tiny_model_dir, tmp_path
):
    train_and_verify(production_service, tiny_model_dir, tmp_path)


def test_worker_errors_fail_the_job_readably(production_service: Service):
    with production_service.client as client:
        job = create_job(client, model="missing-weights")
    job = wait_final(production_service, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "training_failed" and "none" in job["error"]["message"]


def test_cancel_stops_a_running_job_within_a_logging_step(embedded_service: Service):
    with embedded_service.client as client:
        job = create_job(
            client,
            training_config={"max_steps": 10_000, "logging_steps": 1, "per_device_train_batch_size": 2},
        )
        deadline = time.monotonic() + 180
        while not (progress := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"])["step"]:
            assert time.monotonic() < deadline, embedded_service.tail_logs()
            time.sleep(0.2)
        cancelled_at = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["progress"]["step"]
        job = wait_final(embedded_service, job["id"], timeout=60)
        assert job["status"] == "cancelled"
        last_step = max(e["data"]["step"] for e in all_events(client, job["id"]) if e["type"] == "metrics")
        # A metrics post may be in flight as the cancel lands; the next one hears of it, and training stops.
        assert last_step <= cancelled_at + 2, (cancelled_at, last_step)
        assert progress["total_steps"] == 10_000


def test_serve_stops_all_its_processes_on_sigterm(embedded_service: Service):
    serve = embedded_service.processes[0]
    children = [int(pid) for pid in os.popen(f"pgrep -P {serve.pid}").read().split()]
    assert len(children) == 3  # api, worker, inference
    embedded_service.stop()
    assert serve.returncode == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def test_loralib_recipe_with_checkpoints_and_best_model(production_service: Service, tmp_path: Path):
    """The recipe's loralib variant end to end: MergedLinear on q and v, checkpoints, best-model selection."""
    with production_service.client as client:
        job = create_job(
            client,
            validate=True,
            training_config={
                **QUICK_TRAINING,
                "num_train_epochs": 2,
                "save_steps": 4,
                "save_total_limit": 2,
                "load_best_model_at_end": True,
            },
            peft_config={"backend": "loralib", "qkv_slices": ["q", "v"], "r": 8, "lora_alpha": 16},
        )
        job = wait_final(production_service, job["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{production_service.tail_logs()}"
        assert job["shipped_step"] is not None

        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert 1 <= len(checkpoints) <= 3  # save_total_limit 2, plus the best one when it is older
        assert all(c["metrics"]["valid_loss"] is not None for c in checkpoints)
        assert [c["step_number"] for c in checkpoints] == sorted(
            (c["step_number"] for c in checkpoints), reverse=True
        )

        refused = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
        assert refused.status_code == 409 and "qkv_proj" in refused.json()["error"]["message"]
        archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", params={"format": "loralib"})
        assert archive.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            names = set(tar.getnames())
        assert {"lora_state_dict.safetensors", "README.md"} <= names and not any(
            n.endswith(".bin") for n in names
        )
        newest = checkpoints[0]
        ckpt_archive = client.get(
            f"/v1/fine_tuning/jobs/{job['id']}/adapter",
            params={"checkpoint": newest["id"], "format": "loralib"},
        )
        assert ckpt_archive.status_code == 200

        for model in (job["fine_tuned_model"], newest["fine_tuned_model_checkpoint"]):
            answer = ask(client, model, max_tokens=16)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] > 0


def test_qlora_job_trains_and_its_adapter_serves(production_service: Service):
    with production_service.client as client:
        job = create_job(
            client, training_config=QUICK_TRAINING, peft_config={**QUICK_LORA, "quantization": "4bit"}
        )
        job = wait_final(production_service, job["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{production_service.tail_logs()}"
        losses = [e["data"]["train_loss"] for e in all_events(client, job["id"]) if e["type"] == "metrics"]
        assert losses[-1] < losses[0]
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": job["fine_tuned_model"],
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            },
        )
        assert answer.status_code == 200, answer.text


def test_a_job_continues_from_a_fine_tuned_model(production_service: Service):
    """`model: "ft:…"`: the worker fetches the source's adapter through its attempt, and training starts where
    the source ended."""
    with production_service.client as client:
        source = create_job(client, training_config=QUICK_TRAINING, peft_config=QUICK_LORA)
        source = wait_final(production_service, source["id"])
        assert source["status"] == "succeeded", f"{source['error']}\n{production_service.tail_logs()}"
        name = source["fine_tuned_model"]
        job = create_job(client, model=name, training_config=QUICK_TRAINING)
        assert job["model"] == "tiny-phi3" and job["training_config"]["init_from"] == name
        job = wait_final(production_service, job["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{production_service.tail_logs()}"
        events = all_events(client, job["id"])
        said = f"Training starts from the LoRA weights of {name}"
        assert any(event["message"].startswith(said) for event in events)
        before = [e["data"]["train_loss"] for e in all_events(client, source["id"]) if e["type"] == "metrics"]
        after = [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]
        assert abs(after[0] - before[-1]) < abs(after[0] - before[0]), (before, after)


def test_a_client_leaving_mid_stream_frees_its_slot(embedded_service: Service):
    body = {
        "model": "tiny-phi3",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    inference = httpx.Client(
        base_url=embedded_service.inference_url, headers=embedded_service.inference_headers
    )
    with embedded_service.client as client, inference:
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            # The first chunk can come before the engine admits the sequence (its prompt is tokenised on a
            # thread): wait for it to run.
            deadline = time.monotonic() + 10
            while inference.get("/stats").json()["running_sequences"] != 1:
                assert time.monotonic() < deadline, "the sequence never ran"
                time.sleep(0.05)
        # Leaving the block closed the connection mid-stream; the API closes its upstream request in turn.
        deadline = time.monotonic() + 10
        while inference.get("/stats").json()["running_sequences"]:
            assert time.monotonic() < deadline, "the abandoned sequence kept decoding"
            time.sleep(0.1)
