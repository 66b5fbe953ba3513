"""Operating a fleet, through real processes: JSON log lines from the API, the worker and the inference server
that carry the request id end to end and the job id on every worker line of the job, and never a key or a
dataset's content; the Prometheus metrics of all three after real work; the API's graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.jobs.event_stream import SHUTDOWN
from phitune.launch import free_port
from tests.conftest import POSTGRES_URL, REDIS_URL, fresh_postgres_database
from tests.e2e.conftest import Service, _delete_redis_keys, api_alone, service_env
from tests.e2e.conftest import phitune as run_phitune

pytestmark = pytest.mark.e2e

# In every line of the dataset, and so in no log line.
MARKER = "zanzibar-quokka-" + secrets.token_hex(4)
FIELDS = {"ts", "level", "logger", "message", "role"}
CREATED_BY = "create-job-" + secrets.token_hex(4)
CHATTED_BY = "chat-" + secrets.token_hex(4)


def dataset(path: Path) -> Path:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me the {MARKER} word number {i}."},
                {"role": "assistant", "content": f"The {MARKER} word number {i} is ahoy."},
            ]
        }
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@contextlib.contextmanager
def backend() -> Iterator[dict[str, str]]:
    """PostgreSQL and Redis when the test run has them, else the embedded SQLite and filesystem broker."""
    if not (POSTGRES_URL and REDIS_URL):
        yield {}
        return
    prefix = f"phitune-test-{secrets.token_hex(4)}:"
    with fresh_postgres_database() as database_url:
        try:
            yield {"database_url": database_url, "broker_url": REDIS_URL, "broker_key_prefix": prefix}
        finally:
            _delete_redis_keys(prefix)


@pytest.fixture
def json_fleet(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Service, str, str]]:
    """`phitune api`, `phitune worker` and `phitune inference` as separate processes logging JSON; with the
    URLs of the worker's and the inference server's metrics."""
    port, inference_port, worker_metrics_port = free_port(), free_port(), free_port()
    with backend() as servers:
        env = service_env(
            tmp_path,
            port,
            log_format="json",
            worker_metrics_port=str(worker_metrics_port),
            base_models=json.dumps({"tiny-phi3": str(tiny_model_dir)}),
            inference_url=f"http://127.0.0.1:{inference_port}",
            **servers,
        )
        service = Service(f"http://127.0.0.1:{port}", env, tmp_path)
        run_phitune("migrate", env=env)
        service.api_key = run_phitune("keys", "create", "--tenant", "ops", env=env).strip().splitlines()[-1]
        service.start("api", "api", "--port", str(port))
        service.start("worker", "worker")
        service.start("inference", "inference", "--port", str(inference_port))
        service.inference_url = f"http://127.0.0.1:{inference_port}"
        try:
            service.wait_ready(service.inference_url, timeout=120)
            yield (
                service,
                f"http://127.0.0.1:{worker_metrics_port}/metrics",
                f"{service.inference_url}/metrics",
            )
        finally:
            service.stop()


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample a Prometheus endpoint serves, by name and labels."""
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_final(client: httpx.Client, job_id: str, service: Service) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish:\n{service.tail_logs()}")


def log_lines(service: Service) -> dict[str, list[dict]]:
    """Each process's output, every line parsed as JSON (a line that is not fails the test)."""
    parsed = {}
    for log in service.logs:
        lines = []
        for number, line in enumerate(log.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(f"{log.name}:{number} is not JSON: {line[:300]!r}") from None
            assert isinstance(record, dict) and set(record) >= FIELDS, f"{log.name}:{number}: {line[:300]}"
            lines.append(record)
        parsed[log.stem] = lines
    return parsed


def test_a_job_and_a_chat_log_json_with_their_ids_and_no_secret_and_serve_metrics(
    json_fleet: tuple[Service, str, str], tmp_path: Path
) -> None:
    service, worker_metrics, inference_metrics = json_fleet
    with service.client as client:
        with dataset(tmp_path / "secret.jsonl").open("rb") as body:
            uploaded = client.post(
                "/v1/files", files={"file": ("secret.jsonl", body)}, data={"purpose": "fine-tune"}
            )
        assert uploaded.status_code == 200, uploaded.text
        created = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-phi3",
                "training_file": uploaded.json()["id"],
                "training_config": {
                    "num_train_epochs": 2,
                    "per_device_train_batch_size": 8,
                    "logging_steps": 1,
                },
            },
            headers={"X-Request-ID": CREATED_BY},
        )
        assert created.status_code == 200 and created.headers["x-request-id"] == CREATED_BY, created.text
        job = wait_final(client, created.json()["id"], service)
        assert job["status"] == "succeeded", f"{job['error']}\n{service.tail_logs()}"
        before_chat = samples(inference_metrics)
        completion_tokens = 0
        for _ in range(2):  # the first loads the adapter (a miss), the second finds it loaded (a hit)
            chat = client.post(
                "/v1/chat/completions",
                json={
                    "model": job["fine_tuned_model"],
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                },
                headers={"X-Request-ID": CHATTED_BY},
            )
            assert chat.status_code == 200, chat.text
            completion_tokens += chat.json()["usage"]["completion_tokens"]
        # An error is answered with an id too, a fresh one when the client's is not sane.
        refused = client.get("/v1/fine_tuning/jobs/ftjob-nope", headers={"X-Request-ID": "not {sane}"})
        assert refused.status_code == 404 and len(refused.headers["x-request-id"]) == 32
        api_metrics = samples(f"{service.base_url}/metrics")

    # Metrics after real work: the worker's, the inference server's and the API's queue depth.
    worker = samples(worker_metrics)
    assert worker[("phitune_worker_trained_tokens_total", ())] == job["trained_tokens"] > 0
    assert worker[("phitune_worker_attempts_total", (("outcome", "done"),))] == 1
    assert worker[("phitune_worker_jobs_running", ())] == 0
    assert (
        worker[("phitune_worker_training_step", ())]
        == worker[("phitune_worker_training_total_steps", ())]
        > 0
    )
    assert worker[("phitune_worker_training_tokens_per_second", ())] > 0
    model = (("model", "tiny-phi3"),)
    generated = ("phitune_inference_generated_tokens_total", model)
    # The engine's thread counts a generation as it ends, which may be after its reply reached the client.
    deadline = time.monotonic() + 10
    while True:
        inference = samples(inference_metrics)
        counted = inference[generated] - before_chat.get(generated, 0)
        if counted >= completion_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Each chat's own count: the first may stop at the end token before max_tokens, the second not.
    assert counted >= completion_tokens > 0, (counted, completion_tokens)
    assert inference[("phitune_inference_time_to_first_token_seconds_count", model)] >= 2
    assert (
        inference[
            ("phitune_inference_adapter_misses_total", (("model", "tiny-phi3"), ("source", "download")))
        ]
        == 1
    )
    assert inference[("phitune_inference_adapter_hits_total", model)] >= 1
    assert inference[("phitune_inference_adapter_evictions_total", model)] == 0
    assert api_metrics[("phitune_training_queue_depth", (("queue", "training"),))] == 0

    service.stop()
    logs = log_lines(service)
    assert {line["role"] for line in logs["api"]} == {"api"}
    assert any(line.get("request_id") == CREATED_BY for line in logs["api"])
    # The worker: every line from the job's first to its last names the job, its attempt and its request.
    worker_lines = logs["worker"]
    of_job = [i for i, line in enumerate(worker_lines) if line.get("job_id") == job["id"]]
    assert of_job, "no worker line names the job"
    during = worker_lines[of_job[0] : of_job[-1] + 1]
    assert all(line.get("job_id") == job["id"] for line in during), during
    assert all(line.get("request_id") == CREATED_BY for line in during)
    assert any(line.get("attempt") == 1 for line in during)
    # The inference server's lines of the chat carry the API request's id.
    assert any(line.get("request_id") == CHATTED_BY for line in logs["inference"])
    everything = "\n".join(log.read_text() for log in service.logs)
    assert service.api_key not in everything
    assert MARKER not in everything


@pytest.fixture
def api_only(tmp_path: Path) -> Iterator[Service]:
    yield from api_alone(tmp_path, shutdown_grace_seconds="20", log_format="json")


def test_sigterm_lets_a_request_finish_and_ends_a_live_stream_cleanly(
    api_only: Service, tmp_path: Path
) -> None:
    service = api_only
    with service.client as client:
        with dataset(tmp_path / "train.jsonl").open("rb") as body:
            file_id = client.post(
                "/v1/files", files={"file": ("train.jsonl", body)}, data={"purpose": "fine-tune"}
            )
        job = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id.json()["id"]}
        )
        assert job.status_code == 200, job.text  # no worker runs: the job stays queued, its stream open

    # A live stream, read to its end in a thread.
    streamed: list[bytes] = []
    stream_open = threading.Event()

    def follow() -> None:
        with service.client as client:
            path = f"/v1/fine_tuning/jobs/{job.json()['id']}/events?stream=true"
            with client.stream("GET", path, timeout=60) as stream:
                stream_open.set()
                streamed.extend(stream.iter_raw())

    # A slow upload: its body's second half is sent only after the SIGTERM.
    release = threading.Event()
    body_started = threading.Event()
    uploaded: list[httpx.Response] = []
    boundary = "ops-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="late.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    lines = (tmp_path / "train.jsonl").read_bytes()

    def slow_body() -> Iterator[bytes]:
        yield head + lines[: len(lines) // 2]
        body_started.set()
        release.wait(30)
        yield lines[len(lines) // 2 :] + f"\r\n--{boundary}--\r\n".encode()

    def upload() -> None:
        with service.client as client:
            assert client.get("/healthz").status_code == 200  # the connection is open and accepted first
            uploaded.append(
                client.post(
                    "/v1/files",
                    content=slow_body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                )
            )

    threads = [threading.Thread(target=follow), threading.Thread(target=upload)]
    for thread in threads:
        thread.start()
    assert stream_open.wait(30) and body_started.wait(30)
    time.sleep(0.5)  # lets the server read the upload's first half: the request is in flight
    api = service.processes[0]
    api.send_signal(signal.SIGTERM)
    release.set()
    for thread in threads:
        thread.join(30)
    assert api.wait(timeout=30) == 0, service.tail_logs()
    assert uploaded and uploaded[0].status_code == 200, uploaded[0].text if uploaded else service.tail_logs()
    assert uploaded[0].json()["filename"] == "late.jsonl"
    assert b"".join(streamed).endswith(SHUTDOWN)
    log_lines(service)  # and the shutdown logged JSON only
