"""/v1/files over HTTP, on the real databases of the shared fixtures."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from app.config import Settings
from app.errors import PayloadTooLarge
from app.files.upload import FORM_OVERHEAD_BYTES, ReceivedForm, receive_form

BOUNDARY = "phitune-test-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!", "weight": 0}]},
]  # fmt: skip


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def upload(
    client: TestClient,
    auth: dict[str, str],
    content: bytes,
    filename: str = "train.jsonl",
    purpose: str = "fine-tune",
):
    return client.post(
        "/v1/files",
        headers=auth,
        files={"file": (filename, content, "application/jsonl")},
        data={"purpose": purpose},
    )


def uploaded(client: TestClient, auth: dict[str, str], content: bytes, **kwargs: str) -> dict[str, Any]:
    response = upload(client, auth, content, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def stored_files(settings: Settings) -> list[Path]:
    """Every file under the storage root, temp files included."""
    return sorted(path for path in settings.storage_dir.rglob("*") if path.is_file())


def assert_nothing_stored(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    assert stored_files(settings) == []


def error_of(response) -> dict[str, Any]:
    return response.json()["error"]


def multipart_head(purpose: str = "fine-tune") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()


class CountingBody:
    """A chunked request body (no Content-Length) that records how much of it the server pulled."""

    def __init__(self, head: bytes, chunk: bytes, chunks: int) -> None:
        self.head, self.chunk, self.chunks = head, chunk, chunks
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        for _ in range(self.chunks):
            self.sent += len(self.chunk)
            yield self.chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


# -- uploads that are accepted ------------------------------------------------------------------------------


def test_upload_chat_file(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    content = jsonl(*CHAT)
    before = int(time.time())
    body = uploaded(client, auth, content)

    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    assert before <= body["created_at"] <= int(time.time())
    assert body["stats"] == {
        "examples": 2,
        "format": "chat",
        "messages": 7,
        "assistant_turns": 2,  # the weight-0 turn is not trained on
        "characters": len("Be brief.2+2?4") + len("HiHello!ByeBye!"),
        "max_example_characters": len("HiHello!ByeBye!"),
    }
    blob = settings.storage_dir / "files" / f"{body['id']}.jsonl"
    assert stored_files(settings) == [blob]
    assert blob.read_bytes() == content


@pytest.mark.parametrize(
    ("records", "stats"),
    [
        (
            [{"prompt": "Q: 1+1", "completion": " 2"}, {"prompt": "", "completion": "free text"}],
            {"examples": 2, "format": "prompt_completion", "messages": None, "assistant_turns": None,
             "characters": 17, "max_example_characters": 9},
        ),
        (
            [{"text": "one"}, {"text": "three"}, {"text": "é"}],
            {"examples": 3, "format": "text", "messages": None, "assistant_turns": None,
             "characters": 9, "max_example_characters": 5},
        ),
    ],
)  # fmt: skip
def test_upload_prompt_completion_and_text_files(
    client: TestClient, auth: dict[str, str], records: list[dict[str, str]], stats: dict[str, Any]
) -> None:
    content = jsonl(*records)
    body = uploaded(client, auth, content)
    assert body["stats"] == stats
    assert body["sha256"] == hashlib.sha256(content).hexdigest()


def test_file_of_exactly_the_size_limit_is_accepted(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    envelope = len(b'{"text": ""}\n')
    content = b'{"text": "' + b"x" * (settings.max_upload_bytes - envelope) + b'"}\n'
    assert len(content) == settings.max_upload_bytes
    assert uploaded(client, auth, content)["bytes"] == settings.max_upload_bytes


def test_filename_loses_directories(client: TestClient, auth: dict[str, str]) -> None:
    assert (
        uploaded(client, auth, jsonl(*CHAT), filename="C:\\data\\sets/train.jsonl")["filename"]
        == "train.jsonl"
    )


# -- reading, listing, deleting -----------------------------------------------------------------------------


def test_get_content_and_delete(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    content = jsonl(*CHAT)
    created = uploaded(client, auth, content)
    file_id = created["id"]

    assert client.get(f"/v1/files/{file_id}", headers=auth).json() == created

    download = client.get(f"/v1/files/{file_id}/content", headers=auth)
    assert download.status_code == 200
    assert download.content == content
    assert download.headers["content-type"].startswith("application/jsonl")
    assert download.headers["etag"] == f'"{created["sha256"]}"'

    deleted = client.delete(f"/v1/files/{file_id}", headers=auth)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert_nothing_stored(client, auth, settings)
    for response in (
        client.get(f"/v1/files/{file_id}", headers=auth),
        client.get(f"/v1/files/{file_id}/content", headers=auth),
        client.delete(f"/v1/files/{file_id}", headers=auth),
    ):
        assert response.status_code == 404


def test_content_is_not_resent_when_the_client_has_it(client: TestClient, auth: dict[str, str]) -> None:
    created = uploaded(client, auth, jsonl(*CHAT))
    url = f"/v1/files/{created['id']}/content"
    cached = client.get(url, headers={**auth, "If-None-Match": f'"{created["sha256"]}"'})
    assert cached.status_code == 304
    assert cached.content == b""
    stale = client.get(url, headers={**auth, "If-None-Match": '"something-else"'})
    assert stale.status_code == 200


def test_content_supports_ranges(client: TestClient, auth: dict[str, str]) -> None:
    content = jsonl(*CHAT)
    created = uploaded(client, auth, content)
    part = client.get(f"/v1/files/{created['id']}/content", headers={**auth, "Range": "bytes=0-9"})
    assert part.status_code == 206
    assert part.content == content[:10]


def test_list_is_newest_first_with_cursor_and_purpose_filter(
    client: TestClient, auth: dict[str, str]
) -> None:
    ids = [uploaded(client, auth, jsonl({"text": str(n)}))["id"] for n in range(3)]

    first = client.get("/v1/files", headers=auth, params={"limit": 2}).json()
    assert first["object"] == "list"
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]]
    assert (first["has_more"], first["first_id"], first["last_id"]) == (True, ids[2], ids[1])

    second = client.get("/v1/files", headers=auth, params={"limit": 2, "after": first["last_id"]}).json()
    assert [f["id"] for f in second["data"]] == [ids[0]]
    assert second["has_more"] is False

    assert len(client.get("/v1/files", headers=auth, params={"purpose": "fine-tune"}).json()["data"]) == 3
    assert client.get("/v1/files", headers=auth, params={"purpose": "assistants"}).json()["data"] == []


def test_list_order_asc_is_oldest_first_and_after_pages_on_in_that_order(
    client: TestClient, auth: dict[str, str]
) -> None:
    ids = [uploaded(client, auth, jsonl({"text": str(n)}))["id"] for n in range(3)]
    first = client.get("/v1/files", headers=auth, params={"limit": 2, "order": "asc"}).json()
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"] is True
    params = {"limit": 2, "order": "asc", "after": first["last_id"]}
    second = client.get("/v1/files", headers=auth, params=params).json()
    assert ([f["id"] for f in second["data"]], second["has_more"]) == (ids[2:], False)
    wrong = client.get("/v1/files", headers=auth, params={"order": "newest"})
    assert (wrong.status_code, error_of(wrong)["param"]) == (400, "order")


def test_list_limit_out_of_range(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/files", headers=auth, params={"limit": 101})
    assert response.status_code == 400
    assert error_of(response)["param"] == "limit"


# -- who may see what ---------------------------------------------------------------------------------------


def test_every_route_needs_an_api_key(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    file_id = uploaded(client, auth, jsonl(*CHAT))["id"]
    responses = [
        upload(client, {}, jsonl(*CHAT)),
        client.get("/v1/files"),
        client.get(f"/v1/files/{file_id}"),
        client.get(f"/v1/files/{file_id}/content"),
        client.delete(f"/v1/files/{file_id}"),
        upload(client, {"Authorization": "Bearer pt-wrong"}, jsonl(*CHAT)),
    ]
    for response in responses:
        assert response.status_code == 401
        assert error_of(response)["type"] == "authentication_error"
    assert len(stored_files(settings)) == 1


def test_another_tenants_file_is_not_found(
    client: TestClient, auth: dict[str, str], other_auth: dict[str, str]
) -> None:
    file_id = uploaded(client, auth, jsonl(*CHAT))["id"]
    for response in (
        client.get(f"/v1/files/{file_id}", headers=other_auth),
        client.get(f"/v1/files/{file_id}/content", headers=other_auth),
        client.delete(f"/v1/files/{file_id}", headers=other_auth),
    ):
        assert response.status_code == 404
        assert error_of(response) == {
            "message": f"No file with id '{file_id}'",
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "file_not_found",
        }
    assert client.get("/v1/files", headers=other_auth).json()["data"] == []
    assert client.get(f"/v1/files/{file_id}", headers=auth).status_code == 200


def test_unknown_file_is_not_found(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/files/file-doesnotexist", headers=auth)
    assert response.status_code == 404
    assert error_of(response)["code"] == "file_not_found"


# -- invalid datasets ---------------------------------------------------------------------------------------

MISSING_ASSISTANT = {"messages": [{"role": "user", "content": "hi"}]}
UNKNOWN_ROLE = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (jsonl(CHAT[0]) + b"{not json\n" + jsonl(CHAT[1]), [(2, "invalid_json")]),
        (jsonl(CHAT[0], CHAT[1], MISSING_ASSISTANT), [(3, "missing_assistant_turn")]),
        (jsonl(UNKNOWN_ROLE, CHAT[0]), [(1, "invalid_role")]),
        (b"", [(None, "empty_file")]),
        (b"\n\n", [(None, "empty_file")]),
        (jsonl(CHAT[0]) + '{"text": "café"}\n'.encode("latin-1"), [(2, "invalid_utf8")]),
        (
            jsonl(CHAT[0], {"prompt": "p", "completion": "c"}, CHAT[1], {"text": "t"}),
            [(2, "format_mismatch"), (4, "format_mismatch")],
        ),
    ],
    ids=["invalid-json", "no-assistant", "unknown-role", "empty", "blank", "not-utf8", "mixed-formats"],
)
def test_invalid_file_is_rejected_and_nothing_stored(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    content: bytes,
    expected: list[tuple[int | None, str]],
) -> None:
    response = upload(client, auth, content)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_file")
    assert [(d["line"], d["code"]) for d in error["details"]] == expected
    assert all(d["message"] for d in error["details"])
    assert_nothing_stored(client, auth, settings)


def test_invalid_file_message_summarises_the_problems(client: TestClient, auth: dict[str, str]) -> None:
    content = jsonl(CHAT[0]) + b"{\n[]\n" + jsonl(MISSING_ASSISTANT)
    error = error_of(upload(client, auth, content, filename="train.jsonl"))
    assert error["message"].startswith("3 problems in train.jsonl; first on line 2: Invalid JSON")


def test_at_most_100_problems_are_listed(client: TestClient, auth: dict[str, str]) -> None:
    error = error_of(upload(client, auth, b"{\n" * 150))
    assert len(error["details"]) == 100
    assert error["details"][-1]["line"] == 100
    assert error["message"].startswith("150 problems in train.jsonl (first 100 listed)")


# -- size limit ---------------------------------------------------------------------------------------------


def test_file_over_the_limit_is_413(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    content = jsonl({"text": "x" * settings.max_upload_bytes})
    response = upload(client, auth, content)
    assert response.status_code == 413
    assert (error_of(response)["param"], error_of(response)["code"]) == ("file", "file_too_large")
    assert_nothing_stored(client, auth, settings)


def test_chunked_upload_over_the_limit_is_413(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    body = CountingBody(
        multipart_head(), b"x" * 65_536, chunks=20
    )  # no Content-Length: Transfer-Encoding chunked
    response = client.post("/v1/files", headers={**auth, **MULTIPART}, content=iter(body))
    assert response.status_code == 413
    assert error_of(response)["code"] == "file_too_large"
    assert_nothing_stored(client, auth, settings)


def read_form(body: CountingBody, temp: Path, max_file_bytes: int) -> ReceivedForm:
    """Run the upload reader on `body` delivered as ASGI messages, one chunk per message: TestClient reads a
    generator body whole before the app runs, so it cannot show how much of a body the reader pulled."""
    chunks = iter(body)

    async def receive() -> dict[str, Any]:
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    headers = [(b"content-type", MULTIPART["Content-Type"].encode())]
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    return anyio.run(partial(receive_form, request, temp, max_file_bytes=max_file_bytes))


def test_upload_reader_stops_pulling_the_body_just_past_the_limit(tmp_path: Path) -> None:
    body = CountingBody(multipart_head(), b"x" * 65_536, chunks=1000)  # 64 MiB
    temp = tmp_path / "upload"
    limit = 1024 * 1024
    with pytest.raises(PayloadTooLarge):
        read_form(body, temp, limit)
    assert limit < body.sent <= limit + len(body.chunk)
    assert not temp.exists()


def test_declared_length_over_the_limit_is_refused_before_reading(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    body = CountingBody(multipart_head(), b"x" * 65_536, chunks=100)
    declared = {"Content-Length": str(10 * settings.max_upload_bytes)}
    response = client.post("/v1/files", headers={**auth, **MULTIPART, **declared}, content=iter(body))
    assert response.status_code == 413
    assert body.sent == 0
    assert_nothing_stored(client, auth, settings)


def test_chunked_upload_under_the_limit_is_accepted(client: TestClient, auth: dict[str, str]) -> None:
    record = jsonl({"text": "y" * 1000})
    body = CountingBody(multipart_head(), record, chunks=50)
    response = client.post("/v1/files", headers={**auth, **MULTIPART}, content=iter(body))
    assert response.status_code == 200, response.text
    assert response.json()["stats"]["examples"] == 50
    assert response.json()["sha256"] == hashlib.sha256(record * 50).hexdigest()


def test_oversized_text_fields_are_413(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    response = upload(client, auth, jsonl(*CHAT), purpose="x" * 100_000)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert_nothing_stored(client, auth, settings)


def test_the_reader_refuses_a_streamed_text_field_just_past_its_bound(tmp_path: Path) -> None:
    """Text fields are held in memory: a huge one is refused once it passes FORM_OVERHEAD_BYTES, not after a
    batch of the body was read."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'.encode()
    body = CountingBody(head, b"x" * 16_384, chunks=256)  # a 4 MiB field
    with pytest.raises(PayloadTooLarge):
        read_form(body, tmp_path / "upload", 1024 * 1024)
    assert FORM_OVERHEAD_BYTES - len(head) < body.sent <= FORM_OVERHEAD_BYTES + len(body.chunk)


# -- malformed requests -------------------------------------------------------------------------------------


def test_wrong_or_missing_purpose_is_400(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    wrong = upload(client, auth, jsonl(*CHAT), purpose="assistants")
    assert wrong.status_code == 400
    assert (error_of(wrong)["param"], error_of(wrong)["code"]) == ("purpose", "invalid_value")
    missing = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", jsonl(*CHAT))})
    assert missing.status_code == 400
    assert (error_of(missing)["param"], error_of(missing)["code"]) == (
        "purpose",
        "missing_required_parameter",
    )
    assert_nothing_stored(client, auth, settings)


def test_unknown_form_field_is_400_and_nothing_stored(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    """The SDK's `expires_after` is refused, not dropped: files here are kept until deleted."""
    sdk = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=auth["Authorization"].split()[1],
        http_client=client,
        max_retries=0,
    )
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(
            file=("t.jsonl", jsonl(*CHAT)),
            purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert (refused.value.param, refused.value.code) == ("expires_after", "unknown_parameter")
    assert_nothing_stored(client, auth, settings)


def test_missing_file_part_is_400(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/files", headers=auth, files={"other": ("t.jsonl", b"{}")}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400
    assert (error_of(response)["param"], error_of(response)["code"]) == ("file", "missing_required_parameter")


def test_two_file_parts_are_400(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    files = [("file", ("a.jsonl", jsonl(*CHAT))), ("file", ("b.jsonl", jsonl(*CHAT)))]
    response = client.post("/v1/files", headers=auth, files=files, data={"purpose": "fine-tune"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "file"
    assert_nothing_stored(client, auth, settings)


def test_non_multipart_body_is_415(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/files", headers=auth, json={"file": "x", "purpose": "fine-tune"})
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_truncated_body_is_400_and_leaves_no_temp_file(
    client: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    content = multipart_head() + jsonl(*CHAT)  # no closing boundary
    response = client.post("/v1/files", headers={**auth, **MULTIPART}, content=content)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_multipart"
    assert_nothing_stored(client, auth, settings)


# -- the official SDK ---------------------------------------------------------------------------------------


def test_openai_sdk_round_trip(client: TestClient, auth: dict[str, str]) -> None:
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client
    )
    content = jsonl(*CHAT)
    created = sdk.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert created.status == "processed"
    assert sdk.files.retrieve(created.id).bytes == len(content)
    assert sdk.files.content(created.id).read() == content
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.delete(created.id).deleted is True
    with pytest.raises(openai.UnprocessableEntityError, match="first on line 1"):
        sdk.files.create(file=("bad.jsonl", b"{\n"), purpose="fine-tune")
