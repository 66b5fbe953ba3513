"""Issue 11's hostile inputs, each reproduced over HTTP against a real database: every one is now a 4xx in
OpenAI's error shape naming the field (or the dataset line), and leaves no job, file or row behind.

The limits themselves are `app/limits.py` (the README's "Limits" table)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.body_limit import streams_its_body
from app.config import Settings
from app.inference_contract import GenerateBody
from app.limits import MAX_CONTENT_CHARS, MAX_MESSAGES
from app.main import create_app
from tests.serving.stub_store import serve_in_thread
from tests.utils import CHAT_LINES, jsonl, upload_file

BODY_CAP = 64 * 1024  # PHITUNE_MAX_REQUEST_BODY_BYTES of these tests, so that a refused body is small


@pytest.fixture
def capped(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_request_body_bytes": BODY_CAP})


@pytest.fixture
def client(capped: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(capped)) as test_client:
        yield test_client


@pytest.fixture
def training_file(client: TestClient, auth: dict[str, str]) -> str:
    return upload_file(client, auth, CHAT_LINES)


def assert_error(response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def post_raw(client: TestClient, path: str, raw: str, auth: dict[str, str]):
    """POST a JSON text as it is: `1e999`, `Infinity` and lone surrogate escapes are what clients can send."""
    return client.post(path, content=raw.encode(), headers={**auth, "Content-Type": "application/json"})


def create_raw(client: TestClient, auth: dict[str, str], training_file: str, fields: str):
    body = f'{{"model": "tiny-phi3", "training_file": "{training_file}", {fields}}}'
    return post_raw(client, "/v1/fine_tuning/jobs", body, auth)


def assert_nothing_left(client: TestClient, auth: dict[str, str], training_file: str) -> None:
    """No job was created, so the training file is in no job's way: it can be deleted."""
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []
    deleted = client.delete(f"/v1/files/{training_file}", headers=auth)
    assert deleted.status_code == 200, deleted.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # Non-finite numbers: each was a 500, and the job was created anyway (its GET and cancel then 500).
        ('"training_config": {"weight_decay": 1e999}', "training_config.weight_decay"),
        ('"training_config": {"max_grad_norm": Infinity}', "training_config.max_grad_norm"),
        ('"peft_config": {"lora_alpha": 1e999}', "peft_config.lora_alpha"),
        ('"training_config": {"learning_rate": NaN}', "training_config.learning_rate"),
        ('"training_config": {"warmup_ratio": -Infinity}', "training_config.warmup_ratio"),
        ('"peft_config": {"lora_dropout": NaN}', "peft_config.lora_dropout"),
        (
            '"hyperparameters": {"learning_rate_multiplier": 1e999}',
            "hyperparameters.learning_rate_multiplier",
        ),
        # Unbounded numbers: all accepted before.
        ('"training_config": {"max_steps": 1000000000000}', "training_config.max_steps"),
        ('"training_config": {"max_steps": 1180591620717411303424}', "training_config.max_steps"),
        ('"training_config": {"logging_steps": 1000000000000}', "training_config.logging_steps"),
        ('"training_config": {"eval_steps": 1000001}', "training_config.eval_steps"),
        ('"training_config": {"save_steps": 1000001}', "training_config.save_steps"),
        ('"training_config": {"save_total_limit": 101}', "training_config.save_total_limit"),
        ('"training_config": {"max_steps": 10, "save_steps": 11}', "training_config.save_steps"),
        ('"training_config": {"max_steps": 10, "logging_steps": 20}', "training_config.logging_steps"),
        ('"peft_config": {"lora_alpha": 1e300}', "peft_config.lora_alpha"),
        ('"peft_config": {"r": 1025}', "peft_config.r"),
        ('"training_config": {"weight_decay": 2}', "training_config.weight_decay"),
        ('"training_config": {"max_grad_norm": 1e6}', "training_config.max_grad_norm"),
        ('"training_config": {"seed": 2147483648}', "training_config.seed"),
        ('"seed": 4294967295', "seed"),
        ('"hyperparameters": {"n_epochs": 0}', "hyperparameters.n_epochs"),
        ('"hyperparameters": {"batch_size": 1025}', "hyperparameters.batch_size"),
        # Unbounded strings, lists and dicts.
        ('"training_config": {"output_dir": "' + "d" * 4097 + '"}', "training_config.output_dir"),
        (
            '"peft_config": {"target_modules": [' + '"o_proj",' * 64 + '"o_proj"]}',
            "peft_config.target_modules",
        ),
        ('"peft_config": {"target_modules": ["' + "x" * 201 + '"]}', "peft_config.target_modules.0"),
        ('"peft_config": {"modules_to_save": [' + '"a",' * 64 + '"a"]}', "peft_config.modules_to_save"),
        (
            '"training_config": {"gradient_checkpointing_kwargs": {"k": false}}',
            "training_config.gradient_checkpointing_kwargs",
        ),
        ('"metadata": {' + ",".join(f'"k{i}": "v"' for i in range(17)) + "}", "metadata"),
        ('"metadata": {"team": "' + "v" * 513 + '"}', "metadata.team"),
        ('"suffix": "' + "s" * 41 + '"', "suffix"),
        ('"validation_file": "' + "f" * 65 + '"', "validation_file"),
        # Lone surrogates: stored, they made every later read of the job a 500.
        ('"metadata": {"team": "\\ud800"}', "metadata.team"),
        ('"peft_config": {"target_modules": ["o_proj\\udfff"]}', "peft_config.target_modules.0"),
    ],
)
def test_a_job_that_fails_validation_is_a_400_naming_the_field_and_leaves_nothing(
    client, auth, training_file, fields, param
):
    error = assert_error(create_raw(client, auth, training_file, fields), 400, param=param)
    assert error["type"] == "invalid_request_error" and param.split(".")[-1] in error["message"]
    assert_nothing_left(client, auth, training_file)


def test_huge_lists_and_dicts_are_refused_whole(client, auth, training_file):
    """200k target_modules and 100k gradient_checkpointing_kwargs keys: over the body cap, a 413 unread; under
    it (the default cap is 4 MiB), the field's own cap."""
    modules = json.dumps(["o_proj"] * 200_000)
    too_large = create_raw(client, auth, training_file, f'"peft_config": {{"target_modules": {modules}}}')
    assert_error(too_large, 413, code="request_too_large")
    kwargs = json.dumps({f"k{i}": True for i in range(100_000)})
    assert_error(
        create_raw(
            client, auth, training_file, f'"training_config": {{"gradient_checkpointing_kwargs": {kwargs}}}'
        ),
        413,
        code="request_too_large",
    )
    assert_error(
        create_raw(
            client,
            auth,
            training_file,
            '"peft_config": {"target_modules": ' + json.dumps(["o_proj"] * 1000) + "}",
        ),
        400,
        param="peft_config.target_modules",
    )
    assert_nothing_left(client, auth, training_file)


def test_values_at_their_bounds_make_a_job_that_reads_cancels_and_lets_its_file_go(
    client, auth, training_file
):
    body = {
        "model": "tiny-phi3",
        "training_file": training_file,
        "seed": 2**31 - 1,
        "metadata": {f"k{i}": "v" * 512 for i in range(16)},
        "suffix": "s" * 40,
        "training_config": {
            "max_steps": 1_000_000,
            "logging_steps": 1_000_000,
            "save_steps": 1,  # a checkpoint every step of a million: at most save_total_limit are kept
            "num_train_epochs": 2.5,  # fractional: its OpenAI n_epochs was a 500
            "weight_decay": 1.0,
            "max_grad_norm": 1000,
            "learning_rate": 1.0,
            "output_dir": "/somewhere/" + "d" * 4000,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        },
        "peft_config": {
            "r": 1024,
            "lora_alpha": 4096,
            "lora_dropout": 0.999,
            "target_modules": ["o_proj"] * 64,
        },
    }
    created = client.post("/v1/fine_tuning/jobs", json=body, headers=auth)
    assert created.status_code == 200, created.text
    job = created.json()
    config = job["training_config"]
    assert config["save_total_limit"] == 100  # defaulted, so a million checkpoints are never all kept
    assert config["output_dir"] is None and "d" * 100 not in created.text  # accepted, not echoed
    assert job["hyperparameters"]["n_epochs"] == 2.5 and job["seed"] == 2**31 - 1
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json() == job
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == [job]
    assert_error(client.delete(f"/v1/files/{training_file}", headers=auth), 409, code="file_in_use")
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.delete(f"/v1/files/{training_file}", headers=auth).status_code == 200
    # save_total_limit null, as the recipe's dictionaries write it, is the default too
    again = upload_file(client, auth, CHAT_LINES)
    null_limit = create_raw(client, auth, again, '"training_config": {"save_total_limit": null}')
    assert null_limit.json()["training_config"]["save_total_limit"] == 100


CHAT = '{{"model": "tiny-phi3", "messages": [{{"role": "user", "content": "hi"}}], {fields}}}'


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ('"seed": 18446744073709551616', "seed"),  # 2**64: the inference server's 500, answered as a 503
        ('"seed": -9223372036854775809', "seed"),  # below -2**63
        ('"max_tokens": 131073', "max_tokens"),
        ('"max_completion_tokens": 1000000000000', "max_completion_tokens"),
        ('"temperature": NaN', "temperature"),
        ('"top_p": Infinity', "top_p"),
        ('"temperature": 1e999', "temperature"),
        ('"stop": ["a", "b", "c", "d", "e"]', "stop"),
        ('"stop": "' + "s" * 1025 + '"', "stop"),
        ('"stop": ["\\ud800"]', "stop"),
        ('"user": "' + "u" * 257 + '"', "user"),
        ('"n": 2', "n"),
        ('"model": "' + "m" * 301 + '"', "model"),
    ],
)
def test_a_chat_request_out_of_bounds_is_a_400_before_the_inference_server(client, auth, fields, param):
    response = post_raw(client, "/v1/chat/completions", CHAT.format(fields=fields), auth)
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ('[{"role": "user", "content": "\\ud800"}]', "messages.0.content"),  # was a 500
        ('[{"role": "user", "content": "ok \\udc00\\ud83d"}]', "messages.0.content"),
        ('[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]', "messages.0.content"),
        ('[{"role": "user", "content": "x", "name": "\\ud800"}]', "messages.0.name"),
        ("[" + ",".join(['{"role":"user","content":""}'] * (MAX_MESSAGES + 1)) + "]", "messages"),
    ],
)
def test_chat_messages_must_be_unicode_and_bounded(client, auth, messages, param):
    body = f'{{"model": "tiny-phi3", "messages": {messages}}}'
    assert_error(post_raw(client, "/v1/chat/completions", body, auth), 400, param=param)


def test_chat_bounds_are_inclusive(client, auth):
    """At the bounds the request is valid: it reaches the inference server (none listens here: 503)."""
    for fields in ('"seed": -9223372036854775808', '"seed": 9223372036854775807', '"max_tokens": 131072'):
        response = post_raw(client, "/v1/chat/completions", CHAT.format(fields=fields), auth)
        assert response.status_code == 503, response.text


def test_a_message_longer_than_the_content_cap_is_a_400(settings, auth):
    """Under the default body cap of 4 MiB, one character past MAX_CONTENT_CHARS."""
    with TestClient(create_app(settings)) as client:
        too_long = {
            "model": "tiny-phi3",
            "messages": [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}],
        }
        assert_error(
            client.post("/v1/chat/completions", json=too_long, headers=auth), 400, param="messages.0.content"
        )
        parts = [{"type": "text", "text": "x" * (MAX_CONTENT_CHARS // 2 + 1)}] * 2
        split = {"model": "tiny-phi3", "messages": [{"role": "user", "content": parts}]}
        assert_error(
            client.post("/v1/chat/completions", json=split, headers=auth), 400, param="messages.0.content"
        )


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (
            b'{"messages": [{"role": "assistant", "content": "y", "weight": 1' + b"0" * 5000 + b"}]}",
            "invalid_number",
        ),
        (b'{"messages": [{"role": "assistant", "content": "y", "weight": 1e400}]}', "invalid_number"),
        (b'{"messages": [{"role": "assistant", "content": "\\ud800"}]}', "invalid_unicode"),
        (
            b'{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "y"}]}',
            "invalid_unicode",
        ),
    ],
)
def test_a_dataset_line_no_tokenizer_or_float_can_hold_is_a_422_for_that_line(client, auth, line, code):
    """A number too large for a float was a 500 at upload; a lone surrogate was accepted, then failed jobs."""
    content = jsonl(CHAT_LINES[:2]) + line + b"\n" + jsonl(CHAT_LINES[2:])
    response = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", content, "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    error = assert_error(response, 422, code="invalid_file")
    assert [(problem["line"], problem["code"]) for problem in error["details"]] == [(3, code)]
    assert client.get("/v1/files", headers=auth).json()["data"] == []


def test_a_body_over_the_cap_is_a_413_before_authentication(client, auth):
    big = b'{"model": "' + b"x" * BODY_CAP + b'"}'
    for headers in ({}, {"Authorization": "Bearer pt-wrong"}, auth):
        response = client.post(
            "/v1/fine_tuning/jobs", content=big, headers={**headers, "Content-Type": "application/json"}
        )
        error = assert_error(response, 413, code="request_too_large")
        assert str(BODY_CAP) in error["message"] and response.headers["connection"] == "close"
    # Within the cap, the key is checked as before.
    assert_error(client.post("/v1/fine_tuning/jobs", json={"model": "x"}), 401)


def test_uploads_and_worker_archives_keep_their_own_limits(client, auth):
    """A dataset larger than the JSON cap uploads; a worker's archive route checks its token first."""
    lines = CHAT_LINES * (2 * BODY_CAP // len(jsonl(CHAT_LINES)) + 1)
    assert len(jsonl(lines)) > BODY_CAP
    upload_file(client, auth, lines)
    archive = client.put("/internal/v1/jobs/ftjob-x/adapter", content=b"\0" * (2 * BODY_CAP))
    assert_error(archive, 401)
    assert streams_its_body("PUT", "/internal/v1/jobs/ftjob-x/resume_states")
    assert not streams_its_body("POST", "/internal/v1/jobs/ftjob-x/events")
    assert not streams_its_body("POST", "/v1/fine_tuning/jobs") and streams_its_body("POST", "/v1/files")


def http_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one response on `sock` (the server closes the connection after it)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_over_real_http_a_huge_body_is_refused_unread_and_a_chunked_one_after_the_cap(capped):
    """Issue 11: 600 MB of JSON without any API key was read whole before the 401. Now a declared length over
    the cap is answered before a byte of the body is sent, and a chunked body that never ends is answered
    once the cap is passed: a server that read it whole would never answer (the socket would time out)."""
    with serve_in_thread(create_app(capped)) as url:
        address = urlsplit(url)
        request = b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(request + b"Content-Length: 629145600\r\n\r\n")
            status, body = http_response(sock)
        assert status == 413 and body["error"]["code"] == "request_too_large"

        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(request + b"Transfer-Encoding: chunked\r\n\r\n")
            piece = b"[" * 8192
            for _ in range(BODY_CAP // len(piece) + 1):  # just past the cap, and never the last chunk
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            status, body = http_response(sock)
        assert status == 413 and body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 2**64}, "seed"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"max_tokens": 131073}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_the_inference_server_validates_the_same_bounds(fields: dict, param: str) -> None:
    """The /generate body (app.inference_contract) the inference server validates: a caller other than the API
    gets a 400 too, not the 500 a 2**64 seed was."""
    body = {"base_model": "tiny-phi3", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError) as refused:
        GenerateBody.model_validate(body)
    assert refused.value.errors()[0]["loc"][0] == param


def test_a_body_that_is_not_json_is_a_400_saying_so_to_a_caller_with_a_key(client, auth):
    headers = {**auth, "Content-Type": "application/json"}
    for path in ("/v1/fine_tuning/jobs", "/v1/chat/completions"):
        response = client.post(path, content=b'{"model": ', headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_json" and error["param"] is None
        assert error["message"].startswith("The request body is not valid JSON")
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []
