"""The dataset report and the dry run through the `phitune` CLI against a real `phitune serve`: the report
of examples/persona.jsonl, then a dry run of the quickstart's job, with its time estimated from a shorter
job the service ran first, against the job itself run to the end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import REPO, Service, serving
from tests.e2e.test_cli_client import ADMIN_KEY, ok, read_json

pytestmark = pytest.mark.e2e
PERSONA = REPO / "examples" / "persona.jsonl"
# examples/quickstart.py's job; the warm-up job, a sixth as long, measures the throughput first.
QUICKSTART = {
    "num_train_epochs": 60,
    "learning_rate": 0.01,
    "per_device_train_batch_size": 8,
    "logging_steps": 10,
}
FINAL = {"succeeded", "failed", "cancelled"}
PEFT = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serving(tmp_path_factory.mktemp("estimate"), admin_key=ADMIN_KEY)  # as the CLI tests run


def create(service: Service, file_id: str, training_config: dict, *extra: str) -> dict:
    return read_json(
        service,
        *("jobs", "create", "--model", "tiny-phi3", "--training-file", file_id),
        *("--training-config", json.dumps(training_config), "--peft-config", json.dumps(PEFT)),
        *extra,
    )


def wait_final(service: Service, job_id: str) -> dict:
    """The job once it has ended (read over HTTP: a watch's CLI process would outlast its timeout)."""
    while (job := service.client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in FINAL:
        time.sleep(2)
    return job


@pytest.mark.timeout(1800)  # two jobs of the tiny model, on CPUs other tests may share
def test_the_report_and_the_estimate_of_the_quickstart(service: Service) -> None:
    file_id = read_json(service, "files", "upload", str(PERSONA))["id"]
    report = read_json(service, "files", "report", file_id)
    assert (report["examples"], report["duplicate_examples"], report["tokens_unavailable"]) == (40, 0, None)
    assert report["trained_tokens"] < report["tokens"]["total"]  # replies only
    shown = ok(service, "files", "report", file_id)
    assert "40 examples" in shown and f"median {report['tokens']['median']:g}" in shown

    before = create(service, file_id, QUICKSTART, "--dry-run")
    assert before["object"] == "fine_tuning.job.estimate" and before["estimated_seconds"] is None
    assert ok(service, "jobs", "list", "--json").count('"id"') == 0, "a dry run creates no job"
    warm_up = wait_final(service, create(service, file_id, {**QUICKSTART, "num_train_epochs": 10})["id"])
    assert warm_up["status"] == "succeeded"

    estimate = create(service, file_id, QUICKSTART, "--dry-run")
    assert "latest succeeded job" in estimate["basis"] and estimate["estimated_seconds"] > 0
    assert "Steps 300" in ok(
        service,
        "jobs",
        "create",
        "--model",
        "tiny-phi3",
        "--training-file",
        file_id,
        "--training-config",
        json.dumps(QUICKSTART),
        "--peft-config",
        json.dumps(PEFT),
        "--dry-run",
    )
    job = wait_final(service, create(service, file_id, QUICKSTART)["id"])
    assert job["status"] == "succeeded"
    assert (estimate["total_steps"], estimate["trained_tokens"]) == (
        job["progress"]["total_steps"],
        job["trained_tokens"],
    )
    events = service.client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100, "order": "asc"}
    )
    started = next(
        e["created_at"] for e in events.json()["data"] if e["message"].startswith("Training started")
    )
    figures = {
        "report": report,
        "estimate": estimate,
        "measured_seconds": job["finished_at"] - started,
        "created_to_finished_seconds": job["finished_at"] - job["created_at"],
        "job": {key: job[key] for key in ("id", "trained_tokens", "progress")},
    }
    (service.data_dir / "estimate-figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
