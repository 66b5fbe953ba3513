"""Routing jobs to workers by base model (PHITUNE_TRAINING_QUEUES, `phitune worker --queues`), with a real
API process, a real worker process and a real Redis: each model's messages go to its queue, a worker takes
only its queues, one without a job's base model leaves the job queued, and the API sends a lost message again
onto the job's own queue."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from phitune.cli import app as cli
from phitune.launch import REPO
from tests.conftest import REDIS_URL
from tests.e2e.conftest import Service, _delete_redis_keys, api_alone
from tests.utils import CHAT_LINES, upload_file

# A config.json only: the API checks jobs against it; nothing here trains.
MODEL_DIR = REPO / "tests" / "fixtures" / "phi3"
ROUTES = {"model-a": "qa", "model-b": "qb"}  # model-c is not routed: it goes to `training`


@pytest.fixture
def routed_api(tmp_path: Path) -> Iterator[Service]:
    if not REDIS_URL:
        pytest.skip("PHITUNE_TEST_REDIS_URL is not set")
    prefix = f"phitune-test-{secrets.token_hex(4)}:"
    try:
        yield from api_alone(
            tmp_path,
            broker_url=REDIS_URL,
            broker_key_prefix=prefix,
            base_models=json.dumps({model: str(MODEL_DIR) for model in ("model-a", "model-b", "model-c")}),
            training_queues=json.dumps(ROUTES),
            redeliver_seconds="2",
        )
    finally:
        _delete_redis_keys(prefix)


def depths(service: Service) -> dict[str, float]:
    """phitune_training_queue_depth of each queue, from the API's /metrics."""
    text = httpx.get(f"{service.base_url}/metrics", timeout=10).text
    return {
        sample.labels["queue"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "phitune_training_queue_depth"
        for sample in family.samples
    }


def wait_until(predicate, service: Service, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{service.tail_logs()}")


def test_each_model_has_its_queue_and_a_worker_takes_only_its_models(routed_api: Service) -> None:
    service = routed_api
    with service.client as client:
        file_id = upload_file(client, {}, CHAT_LINES)
        job = {
            model: client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id}).json()
            for model in ("model-a", "model-b", "model-c")
        }
        # Cancelled, A's message is still in qa, and a worker that takes it has its claim refused at once.
        assert client.post(f"/v1/fine_tuning/jobs/{job['model-a']['id']}/cancel").status_code == 200
    assert depths(service) == {"qa": 1, "qb": 1, "training": 1}

    # A worker on qa and qb with model-a only (pinned): it takes A's message, and leaves B's job queued.
    worker = service.start(
        "worker",
        "worker",
        "--queues",
        "qa,qb",
        PHITUNE_BASE_MODELS=json.dumps({"model-a": str(MODEL_DIR)}),
    )
    log = service.data_dir / "worker.log"
    wait_until(lambda: f"skipping {job['model-a']['id']}" in log.read_text(), service, "A's message taken")
    dropped = f"{job['model-b']['id']} is on base model model-b, which this worker does not have"
    wait_until(lambda: dropped in log.read_text(), service, "B's message left alone")
    assert job["model-c"]["id"] not in log.read_text()  # `training` is not one of its queues
    worker.terminate()
    worker.wait(timeout=60)

    with service.client as client:
        assert client.get(f"/v1/fine_tuning/jobs/{job['model-b']['id']}").json()["status"] == "queued"
    # B's queue is empty while B is queued: its message was lost, and the API's housekeeping sends it again,
    # onto qb. C's message still waits in `training`, so C is not sent again.
    wait_until(lambda: depths(service) == {"qa": 0, "qb": 1, "training": 1}, service, "B sent again to qb")


def test_a_worker_refuses_a_queue_name_that_is_not_one() -> None:
    result = CliRunner().invoke(cli, ["worker", "--queues", "qa,,qb"])
    assert result.exit_code == 2
    assert "--queues" in result.output
