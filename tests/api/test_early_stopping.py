"""training_config.early_stopping_patience / early_stopping_threshold at job creation and in the claim."""

from __future__ import annotations

import pytest

from tests.api.test_internal import claim
from tests.api.test_jobs import assert_error, create
from tests.utils import CHAT_LINES, upload_file


@pytest.fixture
def dataset(client, auth) -> str:
    return upload_file(client, auth, CHAT_LINES)


def test_early_stopping_needs_a_validation_file(client, auth, dataset):
    response = create(client, auth, training_file=dataset, training_config={"early_stopping_patience": 2})
    error = assert_error(
        response, 400, param="training_config.early_stopping_patience", code="validation_file_required"
    )
    assert "validation_file" in error["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []


def test_early_stopping_implies_load_best_model_at_end_and_reaches_the_worker(client, auth, dataset):
    config = {"early_stopping_patience": 3, "early_stopping_threshold": 0.01}
    job = create(client, auth, training_file=dataset, validation_file=dataset, training_config=config).json()
    expected = {**config, "load_best_model_at_end": True}
    assert {key: job["training_config"][key] for key in expected} == expected
    body, _ = claim(client, job["id"])
    assert {key: body["training_config"][key] for key in expected} == expected


def test_a_job_without_early_stopping_claims_as_older_workers_take_it(client, auth, dataset):
    job = create(client, auth, training_file=dataset).json()
    assert job["training_config"]["early_stopping_patience"] is None
    assert job["training_config"]["early_stopping_threshold"] == 0.0
    body, _ = claim(client, job["id"])
    assert not {"early_stopping_patience", "early_stopping_threshold"} & set(body["training_config"])


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"early_stopping_patience": 2, "load_best_model_at_end": False}, "load_best_model_at_end"),
        ({"early_stopping_threshold": 0.1}, "early_stopping_patience"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"early_stopping_patience": 2, "early_stopping_threshold": -0.1}, "early_stopping_threshold"),
        # A checkpoint at every evaluation, or the best one may not have been kept to ship.
        ({"early_stopping_patience": 2, "logging_steps": 10, "save_steps": 100}, "save_steps"),
    ],
)
def test_contradictory_or_out_of_range_early_stopping_is_400(client, auth, dataset, config, words):
    response = create(client, auth, training_file=dataset, validation_file=dataset, training_config=config)
    assert words in assert_error(response, 400)["message"]
