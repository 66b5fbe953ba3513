"""A whole job on S3 storage through real processes: the API under uvicorn and Celery workers, and moto's
S3 server, a process of its own. The dataset, the checkpoints, the resume state and the adapter live in the
bucket, none in the data dir; workers never see the bucket's credentials; a second API process on the same
database and bucket serves the same downloads byte for byte. On SQLite, and on PostgreSQL where it is set."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phitune.launch import free_port, wait_healthy
from tests.conftest import POSTGRES_URL, fresh_postgres_database
from tests.e2e.conftest import Service, all_events, api_alone
from tests.e2e.test_durability import LONG_TRAINING, LORA, job_state, start_worker, wait_for
from tests.e2e.test_fine_tune import create_job, wait_final
from tests.s3_server import CREDENTIALS, S3Server, moto_server

pytestmark = pytest.mark.e2e
PREFIX = "phitune"
SAVE_TOTAL_LIMIT = 2


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """PostgreSQL where the tests have one (a fleet's database beside its bucket; the storage does not depend
    on the database, so the run is not repeated on SQLite), else SQLite."""
    if POSTGRES_URL:
        with fresh_postgres_database() as url:
            yield url
    else:
        (tmp_path / "api").mkdir()
        yield f"sqlite:///{tmp_path / 'api' / 'phitune.db'}"


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


@pytest.fixture
def service(
    tmp_path: Path, tiny_model_dir: Path, s3: S3Server, bucket: str, database_url: str
) -> Iterator[Service]:
    """`phitune api` on S3 storage; only its process has the bucket's credentials."""
    yield from api_alone(
        tmp_path / "api",
        api_env=CREDENTIALS,
        database_url=database_url,
        storage_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=s3.endpoint_url,
        base_models=json.dumps({"tiny-phi3": str(tiny_model_dir)}),
        worker_token=secrets.token_urlsafe(16),
        resume_state_seconds="2",
    )


def objects(s3: S3Server, bucket: str, kind: str, job_id: str) -> list[str]:
    """The job's keys of one kind (`resume`, `adapters`) in the bucket, without the prefix."""
    return [key.removeprefix(f"{PREFIX}/") for key in s3.keys(bucket, f"{PREFIX}/{kind}/{job_id}/")]


@contextlib.contextmanager
def second_api(service: Service, tmp_path: Path) -> Iterator[httpx.Client]:
    """Another `phitune api` on the same database and bucket, with a data dir of its own."""
    port = free_port()
    data_dir = tmp_path / "second"
    data_dir.mkdir()
    env = {
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_DATABASE_URL": service.env["PHITUNE_DATABASE_URL"],
        "PHITUNE_API_URL": f"http://127.0.0.1:{port}",
        **CREDENTIALS,
    }
    process = service.start("api-2", "api", "--port", str(port), **env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, processes=[process], timeout=60)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service.api_key}"}, timeout=60) as c:
        yield c
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_a_job_lives_in_the_bucket_and_a_second_api_serves_it(
    service: Service, s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    first = start_worker(service, "worker-1")
    # 40 steps, a checkpoint every 5: long enough to stop a worker midway, and more than the limit keeps.
    training = {**LONG_TRAINING, "num_train_epochs": 4, "save_steps": 5, "save_total_limit": SAVE_TOTAL_LIMIT}
    with service.client as client:
        job = create_job(client, training_config=training, peft_config=LORA)
    dataset_key = f"{PREFIX}/files/{job['training_file']}.jsonl"
    assert dataset_key in s3.keys(bucket)

    # A resume state in the bucket; the worker, stopped, hands the job back; the next resumes from it.
    wait_for(lambda: objects(s3, bucket, "resume", job["id"]), service, "a resume state in the bucket")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    handed_back = job_state(service, job["id"])
    assert handed_back["status"] == "queued" and handed_back["resumable_step"] > 0
    states = objects(s3, bucket, "resume", job["id"])
    assert states and all(key.endswith(".tar") for key in states)
    start_worker(service, "worker-2")
    final = wait_final(service, job["id"])
    assert final["status"] == "succeeded", f"{final['error']}\n{service.tail_logs()}"
    with service.client as client:
        events = all_events(client, job["id"])
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [e["message"] for e in events if e["message"].startswith("Resumed from step")] == [
        f"Resumed from step {handed_back['resumable_step']} (attempt 2)"
    ]
    losses = [e["data"]["train_loss"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert losses[-1] < losses[0], losses

    # Checkpoints past save_total_limit and the ended job's resume states are deleted from the bucket.
    made = final["progress"]["total_steps"] // training["save_steps"]
    assert made > SAVE_TOTAL_LIMIT and 0 < len(checkpoints) <= SAVE_TOTAL_LIMIT
    kept_steps = {f"step-{c['step_number']}-" for c in checkpoints}
    adapters = objects(s3, bucket, "adapters", job["id"])
    assert {key.split("/")[-1].split("attempt")[0] for key in adapters} == kept_steps | {"final-"}
    wait_for(lambda: not objects(s3, bucket, "resume", job["id"]), service, "resume states deleted")
    assert [p for p in service.data_dir.rglob("*") if p.is_file() and "storage" in p.parts] == []

    downloads = [
        f"/v1/files/{job['training_file']}/content",
        f"/v1/fine_tuning/jobs/{job['id']}/adapter",
        *(f"/v1/fine_tuning/jobs/{job['id']}/adapter?checkpoint={c['id']}" for c in checkpoints),
        *(f"/v1/files/{file_id}/content" for file_id in final["result_files"]),
    ]
    with service.client as client, second_api(service, tmp_path) as other:
        for url in downloads:
            here, there = client.get(url), other.get(url)
            assert here.status_code == there.status_code == 200, (url, here.text, there.text)
            assert here.content == there.content and len(here.content) > 0, url
            assert here.headers["etag"] == there.headers["etag"], url
            ranged = other.get(url, headers={"Range": "bytes=3-12"})
            assert ranged.status_code == 206 and ranged.content == here.content[3:13], url
    (final_peft,) = [key for key in adapters if "/final-" in key and key.endswith(".peft.tar.gz")]
    with service.client as client:
        served = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").content
    assert served == s3.object(bucket, f"{PREFIX}/{final_peft}")
