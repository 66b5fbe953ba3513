"""`POST /v1/fine_tuning/jobs` with `"dry_run": true`: validated as a create is (the same 4xx), it creates no
job, queues no message and remembers no idempotency key; its steps and tokens are the ones the worker's
trainer runs, and its time comes from the service's own measured throughput."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.models import Job, JobStatus
from app.repositories import jobs
from app.training_plan import packed_rows
from tests.api.test_file_report import PERSONA, TOKENIZER_FILES
from tests.utils import upload_file

# Both ways of batching, with a partial accumulation and a fractional epoch.
PLANS = [
    {
        "packing": True,
        "max_seq_length": 128,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 3,
    },
    {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "num_train_epochs": 1.5},
]


@pytest.fixture
def dry_client(settings: Settings, tiny_model_dir: Path, tmp_path: Path):
    directory = tmp_path / "tiny-phi3"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, directory / name)
    configured = settings.model_copy(update={"base_models": {"tiny-phi3": str(directory)}})
    with TestClient(create_app(configured)) as client:
        yield client


def dry_run(client: TestClient, auth: dict[str, str], headers: dict | None = None, **body):
    body = {"model": "tiny-phi3", "dry_run": True, **body}
    return client.post("/v1/fine_tuning/jobs", json=body, headers={**auth, **(headers or {})})


def test_a_dry_run_creates_nothing(dry_client, auth, database_url) -> None:
    file_id = upload_file(dry_client, auth, PERSONA)
    with session_scope(database_url) as session:
        unsent_before = jobs.unsent_count(session)  # the database is shared by the session's tests
    response = dry_run(dry_client, auth, {"Idempotency-Key": "once"}, training_file=file_id, suffix="x")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "fine_tuning.job.estimate"
    assert body["training_config"]["max_seq_length"] == 2048 and body["peft_config"]["r"] > 0
    assert body["examples"] == 40 and body["total_steps"] > 0 and body["trained_tokens"] > 0
    assert body["estimated_memory_gb"] > 0 and "Memory" in body["basis"]
    assert body["estimated_seconds"] is None and "PHITUNE_ESTIMATE_TOKENS_PER_SECOND" in body["basis"]
    assert dry_client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []
    with session_scope(database_url) as session:
        assert jobs.unsent_count(session) == unsent_before
    # The key was not taken: a real create under it, with another body, is a new job.
    created = dry_client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-phi3", "training_file": file_id},
        headers={**auth, "Idempotency-Key": "once"},
    )
    assert created.status_code == 200 and created.json()["object"] == "fine_tuning.job"


def test_a_dry_run_refuses_what_a_create_refuses(dry_client, auth) -> None:
    file_id = upload_file(dry_client, auth, PERSONA[:4])
    cases = [
        ({"training_file": "file-nope"}, 404, "training_file"),
        ({"training_file": file_id, "model": "nope"}, 400, "model"),
        ({"training_file": file_id, "training_config": {"early_stopping_patience": 2}}, 400, None),
        ({"training_file": file_id, "training_config": {"max_steps": 2, "save_steps": 5}}, 400, None),
    ]
    for body, status, param in cases:
        created = dry_client.post("/v1/fine_tuning/jobs", json={"model": "tiny-phi3", **body}, headers=auth)
        estimated = dry_run(dry_client, auth, **body)
        assert (estimated.status_code, estimated.json()) == (created.status_code, created.json())
        assert estimated.status_code == status
        assert param is None or estimated.json()["error"]["param"] == param


def test_the_time_comes_from_the_measured_throughput(dry_client, auth, database_url) -> None:
    file_id = upload_file(dry_client, auth, PERSONA)
    created = dry_client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
    )
    job_id = created.json()["id"]
    # The job as a worker leaves it: 4000 tokens at 100 tokens/s (the median of its steps) in 50 s.
    with session_scope(database_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        job.status, job.started_at, job.finished_at, job.trained_tokens = (
            JobStatus.SUCCEEDED,
            1000,
            1050,
            4000,
        )
        for speed in (90.0, 100.0, 400.0):
            jobs.add_event(
                session, job_id, "step", level="info", type="metrics", data={"tokens_per_second": speed}
            )
    body = dry_run(dry_client, auth, training_file=file_id).json()
    assert body["estimated_seconds"] == pytest.approx(10 + body["trained_tokens"] / 100, abs=0.1)
    assert "100 tokens/s" in body["basis"]


@pytest.mark.parametrize("plan", PLANS)
def test_the_steps_and_tokens_are_the_workers(dry_client, auth, tiny_model_dir, tmp_path, plan) -> None:
    from tests.worker.conftest import Recorder
    from tests.worker.test_recipe import recipe_inputs
    from worker.recipe import train

    file_id = upload_file(dry_client, auth, PERSONA)
    config = {"num_train_epochs": 1, "logging_steps": 1, "warmup_ratio": 0, **plan}
    body = dry_run(dry_client, auth, training_file=file_id, training_config=config).json()
    run = train(recipe_inputs(tiny_model_dir, tmp_path / "out", **config), Recorder())
    assert body["total_steps"] == run.trainer.state.max_steps == run.trainer.state.global_step
    if float(config["num_train_epochs"]).is_integer():
        assert body["trained_tokens"] == run.trainer.state.num_input_tokens_seen


def test_packing_counts_the_rows_trl_packs() -> None:
    """Over several runs of 1000 examples (TRL packs each on its own) of random lengths."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [random.Random(index).randint(1, 300) for index in range(2500)]
    examples = Dataset.from_dict({"input_ids": [[1] * length for length in lengths]})
    assert packed_rows(lengths, 512) == len(pack_dataset(examples, 512, strategy="bfd"))
