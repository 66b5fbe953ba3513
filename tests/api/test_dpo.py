"""Preference (DPO) jobs on a real database: preference files validated line by line at upload, the method and
its hyperparameters checked and stored at creation, the claim that carries them to the worker (and leaves a
supervised job's as it was), and the result file of a DPO job."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.dataset_format import PREFERENCE, RecordError, line_checker, load_line, validate_record
from app.db import session_scope
from app.jobs.results import DPO_COLUMNS
from app.models import Job
from tests.api.test_init_from import SOURCE_LORA, trained
from tests.api.test_internal import claim
from tests.api.test_jobs import assert_error
from tests.api.test_result_files import metrics, post, result_file, succeed
from tests.utils import CHAT_LINES, jsonl, upload_file

EXAMPLE = Path(__file__).parents[2] / "examples" / "preference.jsonl"
PAIRS = [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines()]
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}


@pytest.fixture
def preference_file(client, auth) -> str:
    return upload_file(client, auth, PAIRS, name="preference.jsonl")


@pytest.fixture
def chat_file(client, auth) -> str:
    return upload_file(client, auth, CHAT_LINES)


def create(client, auth, training_file: str, **body: Any):
    body = {"model": "tiny-phi3", "training_file": training_file, **body}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=auth)


def test_a_preference_file_is_detected_and_counted(client, auth):
    response = client.post(
        "/v1/files",
        files={"file": ("preference.jsonl", jsonl(PAIRS), "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    assert response.status_code == 200, response.text
    stats = response.json()["stats"]
    assert stats["format"] == PREFERENCE and stats["examples"] == len(PAIRS)
    assert stats["characters"] == sum(
        sum(len(m["content"]) for m in pair["input"]["messages"])
        + len(pair["preferred_output"][0]["content"])
        + len(pair["non_preferred_output"][0]["content"])
        for pair in PAIRS
    )


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        (lambda pair: pair.pop("preferred_output"), "invalid_output", '"preferred_output"'),
        (lambda pair: pair["non_preferred_output"][0].update(role="user"), "invalid_output", "assistant"),
        (lambda pair: pair["preferred_output"].append(pair["preferred_output"][0]), "invalid_output", "one"),
        (lambda pair: pair["preferred_output"][0].update(content=""), "invalid_output", "empty"),
        (lambda pair: pair["input"].update(messages=[]), "invalid_messages", "input.messages"),
        (lambda pair: pair.update(tools=[]), "unknown_key", "'tools'"),
    ],
)
def test_a_bad_preference_line_is_a_422_naming_its_line(client, auth, change, code, says):
    pairs = json.loads(json.dumps(PAIRS[:4]))
    change(pairs[2])
    response = client.post(
        "/v1/files",
        files={"file": ("preference.jsonl", jsonl(pairs), "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    error = assert_error(response, 422)
    (problem,) = error["details"]
    assert problem["line"] == 3 and problem["code"] == code and says in problem["message"]
    assert "line 3" in error["message"]


def test_a_preference_and_a_chat_line_make_no_file(client, auth):
    response = client.post(
        "/v1/files",
        files={"file": ("mixed.jsonl", jsonl([PAIRS[0], CHAT_LINES[0]]), "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    (problem,) = assert_error(response, 422)["details"]
    assert problem["line"] == 2 and problem["code"] == "format_mismatch"


def test_a_dpo_job_stores_its_method_and_shows_it_as_openai_does(client, auth, preference_file, database_url):
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}
    response = create(client, auth, preference_file, validation_file=preference_file, method=method)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "beta": 0.2,
                "loss_type": "sigmoid",
                "label_smoothing": 0.0,
                "n_epochs": 2,
                "batch_size": 4,
                "learning_rate_multiplier": 1.0,
            }
        },
    }
    assert job["training_config"]["num_train_epochs"] == 2
    with session_scope(database_url) as session:
        stored = session.query(Job).filter_by(id=job["id"]).one()
        assert stored.method == {
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.2, "loss_type": "sigmoid", "label_smoothing": 0.0}},
        }
    listed = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]
    assert next(item for item in listed if item["id"] == job["id"])["method"] == job["method"]


def test_beta_defaults_to_openais(client, auth, preference_file):
    job = create(client, auth, preference_file, method={"type": "dpo"}).json()
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


def test_the_claim_carries_a_dpo_jobs_method_and_leaves_a_supervised_one_as_it_was(
    client, auth, preference_file, chat_file, database_url
):
    dpo_job = create(client, auth, preference_file, method=DPO).json()
    body, _ = claim(client, dpo_job["id"])
    assert body["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"beta": 0.2, "loss_type": "sigmoid", "label_smoothing": 0.0}},
    }
    supervised = create(client, auth, chat_file).json()
    assert supervised["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": supervised["hyperparameters"]},
    }
    body, _ = claim(client, supervised["id"])
    assert "method" not in body  # the claim of earlier versions, key for key
    # SQL NULL, not JSON null: the 0009 downgrade deletes the jobs whose method IS NOT NULL (DPO's) only.
    with session_scope(database_url) as session:
        supervised_null = text("SELECT method IS NULL FROM jobs WHERE id = :id")
        assert session.scalar(supervised_null, {"id": supervised["id"]})
        assert not session.scalar(supervised_null, {"id": dpo_job["id"]})


def test_a_dpo_job_on_a_supervised_file_is_a_400_naming_the_file(client, auth, preference_file, chat_file):
    error = assert_error(
        create(client, auth, chat_file, method=DPO), 400, param="training_file", code="invalid_file_format"
    )
    assert "preference" in error["message"]
    assert_error(
        create(client, auth, preference_file, validation_file=chat_file, method=DPO),
        400,
        param="validation_file",
        code="invalid_file_format",
    )


def test_a_supervised_job_on_a_preference_file_is_a_400_naming_the_file(
    client, auth, preference_file, chat_file
):
    error = assert_error(
        create(client, auth, preference_file), 400, param="training_file", code="invalid_file_format"
    )
    assert '"type": "dpo"' in error["message"]
    assert_error(
        create(client, auth, chat_file, validation_file=preference_file, method={"type": "supervised"}),
        400,
        param="validation_file",
        code="invalid_file_format",
    )


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"beta": 0}, "method.dpo.hyperparameters.beta"),
        ({"beta": -0.5}, "method.dpo.hyperparameters.beta"),
        ({"beta": 11}, "method.dpo.hyperparameters.beta"),
        ({"beta": "high"}, "method.dpo.hyperparameters.beta"),
        ({"loss_type": "kto"}, "method.dpo.hyperparameters.loss_type"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "method.dpo.hyperparameters.label_smoothing"),
        ({"label_smoothing": -0.1}, "method.dpo.hyperparameters.label_smoothing"),
        ({"label_smoothing": 0.1}, "method.dpo.hyperparameters.label_smoothing"),  # sigmoid has none
        ({"n_epochs": 0}, "method.dpo.hyperparameters.n_epochs"),
        ({"rpo_alpha": 1}, "method.dpo.hyperparameters.rpo_alpha"),
    ],
)
def test_dpo_hyperparameters_out_of_range_are_a_400(client, auth, preference_file, hyperparameters, param):
    method = {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}
    assert_error(create(client, auth, preference_file, method=method), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"peft_config": {"backend": "loralib"}}, "peft_config.backend"),
        ({"training_config": {"packing": True}}, "training_config.packing"),
        ({"training_config": {"train_on_inputs": True}}, "training_config.train_on_inputs"),
        ({"training_config": {"group_by_length": True}}, "training_config.group_by_length"),
        ({"training_config": {"padding_free": True}}, "training_config.padding_free"),
        ({"method": {**DPO, "supervised": {}}}, "method.supervised"),
        ({"hyperparameters": {"n_epochs": 2}, "method": {**DPO, "dpo": {"hyperparameters": {"n_epochs": 3}}}},
         "method.dpo.hyperparameters"),
    ],
)  # fmt: skip
def test_what_dpo_does_not_support_is_a_400(client, auth, preference_file, body, param):
    assert_error(create(client, auth, preference_file, **{"method": DPO, **body}), 400, param=param)


def test_a_dpo_job_shows_its_pairs_batched_padded(client, auth, preference_file):
    job = create(client, auth, preference_file, method=DPO).json()
    assert job["training_config"]["padding_free"] is False


def test_a_supervised_method_with_dpo_settings_is_a_400(client, auth, chat_file):
    method = {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}
    assert_error(create(client, auth, chat_file, method=method), 400, param="method.dpo")


def test_a_dpo_jobs_result_file_holds_its_loss_and_rewards(client, auth, preference_file):
    job_id = create(client, auth, preference_file, validation_file=preference_file, method=DPO).json()["id"]
    _, attempt = claim(client, job_id)
    rewards = {"train_rewards_chosen": 0.5, "train_rewards_rejected": -0.25}
    margins = {"train_rewards_margins": 0.75, "train_rewards_accuracies": 1.0}
    evaluated = {"eval_loss": 0.5, "eval_rewards_margins": 0.5, "eval_rewards_accuracies": 0.75}
    post(client, job_id, attempt, metrics(2, 0.69, **rewards), metrics(4, 0.4, **margins, **evaluated))
    assert succeed(client, job_id, attempt).status_code == 200
    file = result_file(client, auth, job_id)
    content = client.get(f"/v1/files/{file['id']}/content", headers=auth).text
    header, *rows = content.splitlines()
    assert header.split(",") == list(DPO_COLUMNS)
    assert header.startswith("step,train_loss,") and ",valid_loss," in header
    assert rows == ["2,0.69,0.5,-0.25,,,,,,,", "4,0.4,,,0.75,1.0,0.5,,,0.5,0.75"]


# The upload validator's fast path must accept exactly the preference lines the models accept (see
# tests/api/test_format_fast_path.py for the other formats).
def odd_pair(rng: random.Random) -> dict[str, Any]:
    pair = json.loads(json.dumps(rng.choice(PAIRS)))
    odd: list[Any] = [None, 1, "", "x", [], {}, True, 0, [{}]]
    place = rng.choice(["top", "input", "message", "output", "answer", "none"])
    if place == "top":
        key = rng.choice(["input", "preferred_output", "non_preferred_output", "extra"])
        if rng.random() < 0.5:
            pair.pop(key, None)
        else:
            pair[key] = rng.choice(odd)
    elif place == "input":
        pair["input"] = rng.choice([*odd, {"messages": []}, {"messages": [], "tools": []}])
    elif place == "message":
        message = rng.choice(pair["input"]["messages"])
        key = rng.choice(["role", "content", "name", "weight", "extra"])
        message[key] = rng.choice([*odd, "assistant", "user", "robot"])
    elif place == "output":
        key = rng.choice(["preferred_output", "non_preferred_output"])
        pair[key] = rng.choice([*odd, pair[key] * 2, [{"role": "assistant", "content": "a"}]])
    elif place == "answer":
        answer = pair[rng.choice(["preferred_output", "non_preferred_output"])][0]
        key = rng.choice(["role", "content", "name", "weight", "extra"])
        answer[key] = rng.choice([*odd, "assistant", "user", 1.0])
    return pair


def model_stats(line: bytes) -> tuple[int, int, int] | None:
    try:
        obj = load_line(line)
        if obj is None:
            return None
        return 0, 0, validate_record(obj, PREFERENCE).characters
    except RecordError:
        return None


def test_the_fast_path_accepts_exactly_the_preference_lines_the_models_accept():
    rng = random.Random(20261202)
    check = line_checker(PREFERENCE)
    outcomes = {"valid": 0, "invalid": 0}
    for _ in range(3000):
        line = json.dumps(odd_pair(rng)).encode()
        expected = model_stats(line)
        assert check(line) == expected, line
        outcomes["valid" if expected else "invalid"] += 1
    assert min(outcomes.values()) > 500


def test_a_dpo_job_continues_from_a_supervised_model_with_its_lora_settings(client, auth, preference_file):
    source = trained(client, auth, peft_config=SOURCE_LORA)
    response = create(client, auth, preference_file, method=DPO, training_config={"init_from": source})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["training_config"]["init_from"] == source and job["method"]["type"] == "dpo"
    assert job["peft_config"]["r"] == SOURCE_LORA["r"]
    assert job["peft_config"]["target_modules"] == SOURCE_LORA["target_modules"]
    body, _ = claim(client, job["id"])
    assert body["method"]["type"] == "dpo" and body["training_config"]["init_from"] == source
    by_name = create(client, auth, preference_file, method=DPO, model=source)
    assert by_name.status_code == 200 and by_name.json()["training_config"]["init_from"] == source


def test_a_dpo_job_cannot_continue_from_a_loralib_model(client, auth, preference_file):
    source = trained(client, auth, "loralib", peft_config={"backend": "loralib", "r": 8})
    response = create(client, auth, preference_file, method=DPO, training_config={"init_from": source})
    assert_error(response, 400, param="peft_config.backend")
