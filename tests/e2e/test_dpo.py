"""A DPO job end to end through real processes: the preference file uploaded, the worker trains it with
DPOTrainer, the rewards arrive as metrics events and in the result file, and the adapter serves."""

from __future__ import annotations

import pytest

from app.jobs.results import DPO_COLUMNS
from tests.e2e.conftest import REPO, Service, all_events, ask
from tests.e2e.test_fine_tune import QUICK_LORA, upload, wait_final

pytestmark = pytest.mark.e2e
PREFERENCES = REPO / "examples" / "preference.jsonl"


def test_a_dpo_job_trains_reports_its_rewards_and_serves(embedded_service: Service):
    with embedded_service.client as client:
        file_id = upload(client, PREFERENCES)
        body = {
            "model": "tiny-phi3",
            "training_file": file_id,
            "validation_file": file_id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3}}},
            "training_config": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 4},
            "peft_config": QUICK_LORA,
        }
        created = client.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job = wait_final(embedded_service, created.json()["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{embedded_service.tail_logs()}"
        assert job["method"]["type"] == "dpo"
        steps = [e["data"] for e in all_events(client, job["id"]) if e["type"] == "metrics"]
        assert [data["step"] for data in steps] == [4, 8, 12]
        assert steps[-1]["train_rewards_margins"] > steps[0]["train_rewards_margins"]
        assert steps[-1]["eval_rewards_margins"] > steps[0]["eval_rewards_margins"]
        (result,) = job["result_files"]
        header, *rows = client.get(f"/v1/files/{result}/content").text.splitlines()
        assert header.split(",") == list(DPO_COLUMNS) and len(rows) == 3
        answer = ask(client, job["fine_tuned_model"], max_tokens=8)
        assert answer.status_code == 200, answer.text
