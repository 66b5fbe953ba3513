"""Durable training, proven by faults on real processes: the API under uvicorn and Celery workers on the
embedded defaults (SQLite, filesystem broker), and the worker token driving /internal/v1 directly."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from app.broker import enqueue_training, make_celery
from app.config import Settings
from phitune.launch import free_port
from tests.conftest import REDIS_URL
from tests.e2e.conftest import Service, api_alone
from tests.e2e.test_fine_tune import all_events, create_job, wait_final

pytestmark = pytest.mark.e2e
# 40 persona conversations in batches of 4: 10 steps an epoch, 120 in all; long enough to interrupt.
LONG_TRAINING = {
    "num_train_epochs": 12,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 4,
    "logging_steps": 5,
}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Service]:
    """`phitune api` on a fresh embedded data dir; workers are started by each test. A short lease, so a
    lost worker is noticed in seconds, unless the test's `lease_seconds` marker says otherwise. Tests that
    take a `redis` fixture get their broker there."""
    marker = request.node.get_closest_marker("lease_seconds")
    broker = {"broker_url": request.getfixturevalue("redis").url} if "redis" in request.fixturenames else {}
    yield from api_alone(
        tmp_path,
        redeliver_seconds="5",
        **broker,
        base_models=json.dumps({"tiny-phi3": str(tiny_model_dir)}),
        worker_token=secrets.token_urlsafe(16),
        lease_seconds=str(marker.args[0] if marker else 8),
        resume_state_seconds="2",
        # 200 jobs created at once by one key: past the limits' defaults (tests/api/test_limits.py).
        max_active_jobs_per_tenant="0",
        rate_limit_per_minute="0",
    )


@dataclass
class RedisServer:
    """A Redis of the test's own, so it can be killed and restarted without touching the shared one."""

    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Like the shared server: nothing kept on disk, so a restart loses every message.
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    if not REDIS_URL:
        pytest.skip("PHITUNE_TEST_REDIS_URL is not set")
    assert shutil.which("redis-server"), "redis-server is needed to restart a broker"
    server = RedisServer(free_port())
    server.start()
    yield server
    server.kill()


def start_worker(service: Service, name: str) -> subprocess.Popen:
    return service.start(name, "worker")


def wait_for(predicate, service: Service, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{service.tail_logs()}")


def job_state(service: Service, job_id: str) -> dict:
    with service.client as client:
        return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def metric_steps(events: list[dict]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "metrics"]


def test_claim_then_heartbeat_never_sees_an_uncommitted_claim(service: Service):
    """Every write is committed before its 200: 200 claims, each followed at once by a heartbeat."""
    worker = {"Authorization": f"Bearer {service.env['PHITUNE_WORKER_TOKEN']}"}
    with service.client as client:
        job_ids = [create_job(client, training_config=LONG_TRAINING)["id"] for _ in range(200)]
    refused = []
    with httpx.Client(base_url=service.base_url + "/internal/v1", headers=worker, timeout=30) as internal:
        for job_id in job_ids:
            claim = internal.post(f"/jobs/{job_id}/claim")
            assert claim.status_code == 200, claim.text
            beat = internal.post(
                f"/jobs/{job_id}/heartbeat", headers={"Authorization": f"Bearer {claim.json()['token']}"}
            )
            if beat.status_code != 200:
                refused.append(beat.text)
    assert refused == []


def state_files(service: Service, job_id: str) -> list[Path]:
    """The job's stored resume states, oldest first."""
    return sorted(
        (service.data_dir / "storage" / "resume" / job_id).glob("*.tar"), key=lambda p: p.stat().st_mtime
    )


def test_sigkill_resumes_from_the_last_good_state(service: Service):
    """SIGKILL after two states; the newest is then damaged in storage: the next attempt skips it and
    resumes from the one before."""
    first = start_worker(service, "worker-1")
    with service.client as client:  # a state every 10 steps (and every 2 s)
        job = create_job(client, training_config={**LONG_TRAINING, "save_steps": 10}, peft_config=LORA)
    wait_for(lambda: len(state_files(service, job["id"])) >= 2, service, "two resume states")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    older, newest = state_files(service, job["id"])[-2:]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated on disk
    start_worker(service, "worker-2")
    wait_for(lambda: job_state(service, job["id"])["attempt"] == 2, service, "attempt 2")
    detected_after = time.monotonic() - killed_at
    final = wait_final(service, job["id"])
    assert final["status"] == "succeeded", final["error"]
    with service.client as client:
        events = all_events(client, job["id"])
        assert len(client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").content) > 0
    with sqlite3.connect(service.data_dir / "phitune.db") as db:
        finals = db.execute(
            "SELECT COUNT(*) FROM artifacts WHERE job_id = ? AND scope = 'final'", (job["id"],)
        )
        assert finals.fetchone()[0] == 1  # exactly one final adapter
    step_of = {path: int(path.name.split("-step-")[1].split("-")[0]) for path in (older, newest)}
    messages = [e["message"] for e in events]
    skipped = [m for m in messages if m.startswith("Skipped the resume state")]
    assert skipped == [
        f"Skipped the resume state of step {step_of[newest]}: "
        "its sha256 does not match the one recorded when it was stored"
    ]
    resumed = [e for e in events if e["message"].startswith("Resumed from step")]
    assert [e["message"] for e in resumed] == [f"Resumed from step {step_of[older]} (attempt 2)"]
    after = metric_steps(events[events.index(resumed[0]) :])
    assert after[0] > step_of[older] and after[0] - step_of[older] <= LONG_TRAINING["logging_steps"]
    assert after[-1] == final["progress"]["total_steps"] == 120
    print(f"attempt 2 claimed {detected_after:.1f} s after SIGKILL; resumed from {step_of[older]}")


def test_sigterm_hands_the_job_back_and_another_worker_finishes_it(service: Service):
    first = start_worker(service, "worker-1")
    with service.client as client:
        job = create_job(client, training_config=LONG_TRAINING, peft_config=LORA)
    wait_for(lambda: job_state(service, job["id"])["progress"]["step"] >= 10, service, "training to start")
    sent = time.monotonic()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    exit_seconds = time.monotonic() - sent
    handed_back = job_state(service, job["id"])
    assert handed_back["status"] == "queued" and handed_back["resumable_step"] >= 10
    start_worker(service, "worker-2")
    final = wait_final(service, job["id"])
    assert final["status"] == "succeeded" and final["attempt"] == 2
    with service.client as client:
        messages = [e["message"] for e in all_events(client, job["id"])]
    assert any("handed the job back (the worker is shutting down)" in m for m in messages)
    assert f"Resumed from step {handed_back['resumable_step']} (attempt 2)" in messages
    print(f"worker exited {exit_seconds:.1f} s after SIGTERM, state at step {handed_back['resumable_step']}")


def test_pause_and_resume_through_the_openai_sdk(service: Service):
    start_worker(service, "worker")
    with service.client as client:
        job = create_job(client, training_config=LONG_TRAINING, peft_config=LORA)
    wait_for(lambda: job_state(service, job["id"])["progress"]["step"] >= 10, service, "training to start")
    sdk = openai.OpenAI(base_url=service.base_url + "/v1", api_key=service.api_key)
    sdk.fine_tuning.jobs.pause(job["id"])
    paused = wait_for(
        lambda: (s := job_state(service, job["id"]))["status"] == "paused" and s, service, "the pause"
    )
    assert sdk.fine_tuning.jobs.pause(job["id"]).status == "paused"  # pausing again changes nothing
    assert sdk.fine_tuning.jobs.resume(job["id"]).status == "queued"
    with pytest.raises(openai.ConflictError):  # queued or running again: not paused
        sdk.fine_tuning.jobs.resume(job["id"])
    final = wait_final(service, job["id"])
    assert final["status"] == "succeeded"
    with service.client as client:
        events = all_events(client, job["id"])
    messages = [e["message"] for e in events]
    resumed_at = messages.index(f"Resumed from step {paused['resumable_step']} (attempt 2)")
    assert metric_steps(events[resumed_at:])[0] > paused["resumable_step"]


def test_a_message_delivered_twice_trains_once(service: Service):
    start_worker(service, "worker")
    with service.client as client:
        job = create_job(client, training_config={**LONG_TRAINING, "num_train_epochs": 2}, peft_config=LORA)
    settings = Settings(data_dir=service.data_dir)
    celery = make_celery(settings)
    enqueue_training(celery, job["id"], job["model"])
    enqueue_training(celery, job["id"], job["model"])
    assert wait_final(service, job["id"])["status"] == "succeeded"
    with service.client as client:
        messages = [e["message"] for e in all_events(client, job["id"])]
    assert sum(m.startswith("Training started") for m in messages) == 1
    # The worker takes the copies too, and the claim refuses them.
    wait_for(lambda: "skipping" in (service.data_dir / "worker.log").read_text(), service, "a refused copy")


@pytest.mark.lease_seconds(120)  # longer than the API's restart: the worker carries on
def test_an_api_restart_mid_training_loses_no_event_and_duplicates_none(service: Service):
    start_worker(service, "worker")
    with service.client as client:
        job = create_job(client, training_config=LONG_TRAINING, peft_config=LORA)
    wait_for(lambda: job_state(service, job["id"])["progress"]["step"] >= 10, service, "training to start")
    api = service.processes[0]
    api.send_signal(signal.SIGTERM)
    api.wait(timeout=30)
    service.processes.remove(api)
    time.sleep(3)  # the worker's posts fail meanwhile and are retried
    port = service.base_url.rsplit(":", 1)[1]
    service.start("api-2", "api", "--port", port)
    service.wait_ready()
    final = wait_final(service, job["id"])
    assert final["status"] == "succeeded" and final["attempt"] == 1
    with sqlite3.connect(service.data_dir / "phitune.db") as db:
        numbers = [
            row[0]
            for row in db.execute(
                "SELECT worker_seq FROM job_events WHERE job_id = ? AND worker_seq IS NOT NULL ORDER BY seq",
                (job["id"],),
            )
        ]
    assert numbers == list(range(1, len(numbers) + 1))  # every numbered event once, in order: no gap
    with service.client as client:
        steps = metric_steps(all_events(client, job["id"]))
    assert steps == sorted(set(steps)) and steps[-1] == 120


@pytest.mark.lease_seconds(30)  # the worker's connection to Redis drops, not its lease
def test_a_redis_restart_loses_no_job(service: Service, redis: RedisServer):
    start_worker(service, "worker")
    with service.client as client:
        running = create_job(client, training_config=LONG_TRAINING, peft_config=LORA)
        waiting = create_job(
            client, training_config={**LONG_TRAINING, "num_train_epochs": 1}, peft_config=LORA
        )
    wait_for(lambda: job_state(service, running["id"])["progress"]["step"] >= 5, service, "training to start")
    assert job_state(service, waiting["id"])["status"] == "queued"
    redis.kill()  # the waiting job's message is gone with it
    time.sleep(2)
    redis.start()
    for job in (running, waiting):
        final = wait_final(service, job["id"], timeout=240)
        assert final["status"] == "succeeded", final["error"]


def test_a_job_whose_worker_dies_on_every_attempt_fails_and_the_next_job_runs(service: Service):
    with service.client as client:
        doomed = create_job(client, training_config=LONG_TRAINING, peft_config=LORA)
    for attempt in (1, 2, 3):
        worker = start_worker(service, f"worker-{attempt}")
        wait_for(
            lambda n=attempt: job_state(service, doomed["id"])["attempt"] == n, service, f"attempt {attempt}"
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        service.processes.remove(worker)
    failed = wait_for(
        lambda: (s := job_state(service, doomed["id"]))["status"] == "failed" and s,
        service,
        "the job to fail",
    )
    assert failed["error"]["code"] == "worker_lost" and failed["attempt"] == 3
    with service.client as client:
        messages = [e["message"] for e in all_events(client, doomed["id"])]
        assert "Worker stopped responding on attempt 3; 3 attempts were lost" in messages
        after = create_job(client, training_config={**LONG_TRAINING, "num_train_epochs": 1}, peft_config=LORA)
    start_worker(service, "worker-4")
    assert wait_final(service, after["id"])["status"] == "succeeded"
