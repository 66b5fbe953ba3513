"""GET /v1/files/{id}/report: the dataset's report counts, example by example, the tokens the worker trains
(worker.data with the transformers tokenizer), is kept in storage once computed, and says why it has no
token counts when the tokenizer cannot be read without torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.base_tokenizer import load_base_tokenizer
from app.chat_tokens import tokenize_example
from app.config import Settings
from app.files import report as reports
from app.files.report import ReportKey
from app.main import create_app
from tests.utils import upload_file

PERSONA_FILE = Path(__file__).parents[2] / "examples" / "persona.jsonl"
PERSONA = [json.loads(line) for line in PERSONA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"]


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny Phi-3's tokenizer files (and config.json), in a directory a test may take them out of."""
    directory = tmp_path / "tiny-phi3"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, directory / name)
    return directory


@pytest.fixture
def report_client(settings: Settings, model_dir: Path):
    configured = settings.model_copy(update={"base_models": {"tiny-phi3": str(model_dir)}})
    with TestClient(create_app(configured)) as client:
        yield client


def report(client: TestClient, auth: dict[str, str], file_id: str, **params) -> dict:
    response = client.get(f"/v1/files/{file_id}/report", params=params, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("max_seq_length", [2048, 64])
def test_the_persona_report_counts_what_the_worker_trains(
    report_client, auth, tokenizer, tiny_model_dir, max_seq_length
) -> None:
    from worker.data import load_tokenized_dataset
    from worker.data import tokenize_example as worker_tokenize

    file_id = upload_file(report_client, auth, PERSONA, name="persona.jsonl")
    body = report(report_client, auth, file_id, max_seq_length=max_seq_length)

    # Example by example, the torch-free tokenizer gives the worker's ids and loss mask.
    light = load_base_tokenizer(str(tiny_model_dir))
    worked = [worker_tokenize(record, tokenizer) for record in PERSONA]
    assert [tokenize_example(record, light) for record in PERSONA] == worked
    lengths = sorted(len(ids) for ids, _ in worked)
    trained = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=max_seq_length)
    assert body["object"] == "file.report" and body["model"] == "tiny-phi3"
    assert body["examples"] == len(PERSONA) == 40
    assert body["tokens"]["total"] == sum(lengths)
    assert (body["tokens"]["min"], body["tokens"]["max"]) == (lengths[0], lengths[-1])
    assert sum(bin["count"] for bin in body["tokens"]["histogram"]) == 40
    assert body["trained_tokens"] == trained.num_trained_tokens
    assert body["truncated_tokens"] == trained.num_truncated_tokens
    assert body["dropped_examples"] == trained.num_dropped
    assert body["truncated_examples"] == sum(length > max_seq_length for length in lengths)
    assert (body["duplicate_examples"], body["empty_assistant_turns"], body["tokens_unavailable"]) == (
        0,
        0,
        None,
    )
    if max_seq_length == 64:
        assert body["truncated_examples"] > 0, "the short length exercises truncation"


def test_the_real_phi3_tokenizer_counts_as_transformers_does(phi3_tokenizer_dir) -> None:
    from worker.data import tokenize_example as worker_tokenize
    from worker.tokenizer import load_tokenizer

    phi3, light = load_tokenizer(str(phi3_tokenizer_dir)), load_base_tokenizer(str(phi3_tokenizer_dir))
    weighted = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Ahoy there", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Arr!"},
        ]
    }
    for record in [*PERSONA, weighted, {"prompt": "Hi", "completion": " Arr"}, {"text": "Yo ho ho"}]:
        for train_on_inputs in (False, True):
            assert tokenize_example(record, light, train_on_inputs=train_on_inputs) == worker_tokenize(
                record, phi3, train_on_inputs=train_on_inputs
            )


def test_duplicates_and_empty_replies(report_client, auth) -> None:
    reply = {"role": "assistant", "content": "Arr"}
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, reply]},
        {"messages": [{"role": "user", "content": "Hi"}, reply]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}, reply]},
        {"messages": [{"content": "Hi", "role": "user"}, reply]},  # the same example, keys in another order
    ]
    body = report(report_client, auth, upload_file(report_client, auth, records))
    assert (body["examples"], body["duplicate_examples"], body["empty_assistant_turns"]) == (4, 2, 1)


def test_a_report_is_kept_and_says_why_it_has_no_tokens(
    report_client, auth, model_dir, tiny_model_dir
) -> None:
    file_id = upload_file(report_client, auth, PERSONA[:5])
    first = report(report_client, auth, file_id, max_seq_length=512)
    storage = report_client.app.state.storage
    key = ReportKey("tiny-phi3", str(model_dir), 512).storage_key(file_id)
    assert storage.exists(key)
    (model_dir / "tokenizer.json").unlink()
    # Asked again, the report is read from storage: it needs no tokenizer.
    assert report(report_client, auth, file_id, max_seq_length=512) == first
    # One not computed before says why it has no token counts, and still counts the rest.
    other = report(report_client, auth, file_id, max_seq_length=256)
    assert other["tokens"] is None and other["trained_tokens"] is None
    assert "tokenizer.json" in other["tokens_unavailable"]
    assert (other["examples"], other["duplicate_examples"]) == (5, 0)
    # That one was not kept: once the tokenizer is there, it counts.
    shutil.copy(tiny_model_dir / "tokenizer.json", model_dir / "tokenizer.json")
    assert report(report_client, auth, file_id, max_seq_length=256)["tokens"]["total"] > 0


def test_bad_requests(report_client, auth, other_auth) -> None:
    file_id = upload_file(report_client, auth, PERSONA[:2])
    cases = [
        (f"/v1/files/{file_id}/report?model=nope", auth, 400, "model"),
        ("/v1/files/file-nope/report", auth, 404, "file_id"),
        (f"/v1/files/{file_id}/report", other_auth, 404, "file_id"),  # another tenant's file
    ]
    for url, headers, status, param in cases:
        response = report_client.get(url, headers=headers)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
    response = report_client.get(f"/v1/files/{file_id}/report?max_seq_length=1", headers=auth)
    assert response.status_code in (400, 422) and "max_seq_length" in response.text


def test_reports_computed_at_once_are_few_and_the_rest_told_to_retry(report_client, auth) -> None:
    file_id = upload_file(report_client, auth, PERSONA[:3])
    for _ in range(reports.MAX_CONCURRENT_REPORTS):  # as many reports as may run are running
        reports._COMPUTING.acquire()
    try:
        busy = report_client.get(f"/v1/files/{file_id}/report", headers=auth)
    finally:
        for _ in range(reports.MAX_CONCURRENT_REPORTS):
            reports._COMPUTING.release()
    assert busy.status_code == 429 and busy.headers["retry-after"] == "5", busy.text
    assert report_client.get(f"/v1/files/{file_id}/report", headers=auth).status_code == 200
