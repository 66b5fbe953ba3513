"""Storage behind one interface: the same contract from the local directory and from an S3 bucket served by a
real S3-compatible server (moto's server mode, a process of its own), and the API's routes on both."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.storage import LocalStorage, Storage
from app.storage.s3 import S3Storage
from tests.api.test_checkpoints import store_checkpoint
from tests.api.test_internal import claim, tiny_archive
from tests.api.test_resume_states import put_state
from tests.s3_server import CREDENTIALS, S3Server, moto_server
from tests.utils import CHAT_LINES, jsonl, upload_file

PREFIX = "tenant-data/phitune"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS variables boto3 reads, as a deployment sets them."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(s3: S3Server, credentials: None) -> str:
    return s3.new_bucket()


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
    # Parts of S3's smallest size, so that a blob of a few MiB goes up in several.
    return S3Storage(
        f"s3://{bucket}/{PREFIX}", tmp_path / "tmp", endpoint_url=s3.endpoint_url, part_bytes=5 * MIB
    )


def temp_file(storage: Storage, content: bytes) -> Path:
    temp = storage.temp_path()
    temp.write_bytes(content)
    return temp


def read_all(storage: Storage, key: str) -> bytes:
    return b"".join(storage.read(key, 0, storage.size(key)))


def test_a_committed_blob_is_read_whole_and_in_ranges(storage: Storage) -> None:
    content = bytes(range(256)) * 40
    temp = temp_file(storage, content)
    storage.commit(temp, "files/file-a.jsonl")
    assert not temp.exists(), "the temp file is consumed"
    assert storage.exists("files/file-a.jsonl") and not storage.exists("files/file-b.jsonl")
    assert storage.size("files/file-a.jsonl") == len(content)
    assert read_all(storage, "files/file-a.jsonl") == content
    for start, stop in [(0, 1), (10, 20), (5000, len(content)), (len(content) - 1, len(content)), (7, 7)]:
        assert b"".join(storage.read("files/file-a.jsonl", start, stop)) == content[start:stop]
    with pytest.raises(FileNotFoundError):
        storage.size("files/file-b.jsonl")


def test_a_blob_larger_than_a_part_goes_up_in_parts_and_comes_back_whole(storage: Storage) -> None:
    content = os.urandom(11 * MIB + 3)  # three parts of an S3 upload
    storage.commit(temp_file(storage, content), "adapters/ftjob-x/final.peft.tar.gz")
    back = read_all(storage, "adapters/ftjob-x/final.peft.tar.gz")
    assert hashlib.sha256(back).digest() == hashlib.sha256(content).digest()
    middle = b"".join(storage.read("adapters/ftjob-x/final.peft.tar.gz", 5 * MIB - 2, 5 * MIB + 2))
    assert middle == content[5 * MIB - 2 : 5 * MIB + 2]


def test_a_commit_replaces_and_a_delete_removes(storage: Storage) -> None:
    storage.commit(temp_file(storage, b"first"), "resume/ftjob-x/a.tar")
    storage.commit(temp_file(storage, b"second"), "resume/ftjob-x/a.tar")
    assert read_all(storage, "resume/ftjob-x/a.tar") == b"second"
    storage.delete("resume/ftjob-x/a.tar")
    assert not storage.exists("resume/ftjob-x/a.tar")
    storage.delete("resume/ftjob-x/a.tar")  # deleting what is gone is no error: deletes run after commits


def test_a_failed_commit_leaves_the_previous_blob(storage: Storage) -> None:
    storage.commit(temp_file(storage, b"kept"), "files/file-a.jsonl")
    vanished = storage.temp_path()
    with pytest.raises(FileNotFoundError):
        storage.commit(vanished, "files/file-a.jsonl")
    assert read_all(storage, "files/file-a.jsonl") == b"kept"


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "files/../../escape", ""])
def test_keys_stay_under_the_root(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.exists(key)


def test_storage_answers_its_readiness_check(storage: Storage) -> None:
    storage.check()


def test_a_multipart_upload_that_fails_midway_is_aborted(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    storage = S3Storage(f"s3://{bucket}/{PREFIX}", tmp_path, endpoint_url=s3.endpoint_url, part_bytes=5 * MIB)
    storage.commit(temp_file(storage, b"the previous adapter"), "adapters/ftjob-x/a.tar.gz")
    sent_parts: list[str] = []

    def drop_the_connection_after_the_first_part(request, **_) -> None:
        sent_parts.append(request.url)
        if "partNumber=1" not in request.url:  # every try of part 2, retries too, fails on the wire
            raise EndpointConnectionError(endpoint_url=request.url)

    storage.client.meta.events.register("before-send.s3.UploadPart", drop_the_connection_after_the_first_part)
    temp = temp_file(storage, os.urandom(11 * MIB))
    with pytest.raises(EndpointConnectionError):
        storage.commit(temp, "adapters/ftjob-x/a.tar.gz")
    assert not temp.exists(), "the temp file is removed either way"
    assert len(sent_parts) >= 2, "the upload failed mid-way, after a part was stored"
    assert s3.incomplete_uploads(bucket) == [], "no half-finished multipart upload remains"
    assert s3.object(bucket, f"{PREFIX}/adapters/ftjob-x/a.tar.gz") == b"the previous adapter"


def test_a_commit_streams_in_parts_never_holding_the_blob(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    storage = S3Storage(f"s3://{bucket}/{PREFIX}", tmp_path, endpoint_url=s3.endpoint_url, part_bytes=5 * MIB)
    content = os.urandom(30 * MIB)
    temp = temp_file(storage, content)
    tracemalloc.start()
    try:
        storage.commit(temp, "adapters/ftjob-x/big.tar.gz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 5 * MIB, f"{peak / MIB:.1f} MiB held to send 30 MiB"  # a part and its copy on the wire
    assert s3.object(bucket, f"{PREFIX}/adapters/ftjob-x/big.tar.gz") == content


def test_a_bad_storage_url_is_refused_at_start(tmp_path: Path) -> None:
    for url in ["s3://", "http://bucket/prefix", "s3:/bucket", "/var/lib/phitune"]:
        with pytest.raises(ValueError, match="storage_url"):
            Settings(data_dir=tmp_path, storage_url=url)


# The API's routes on both backends.


@pytest.fixture
def s3_settings(settings: Settings, s3: S3Server, bucket: str) -> Settings:
    return settings.model_copy(
        update={"storage_url": f"s3://{bucket}/{PREFIX}", "s3_endpoint_url": s3.endpoint_url}
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, settings: Settings) -> tuple[Settings, str | None]:
    """The test's settings on one backend, and the bucket when it is S3."""
    if request.param == "local":
        return settings, None
    return request.getfixturevalue("s3_settings"), request.getfixturevalue("bucket")


@pytest.fixture
def api(backend: tuple[Settings, str | None]) -> Iterator[TestClient]:
    with TestClient(create_app(backend[0])) as client:
        yield client


def stored_keys(backend: tuple[Settings, str | None], s3: S3Server) -> list[str]:
    """What the backend holds, as keys; the local directory's staging area aside."""
    settings, bucket = backend
    if bucket is not None:
        return [key.removeprefix(f"{PREFIX}/") for key in s3.keys(bucket)]
    root = settings.storage_dir
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and root / "tmp" not in p.parents
    )


def test_downloads_answer_alike_from_both_backends(api: TestClient, auth, backend, s3: S3Server) -> None:
    content = jsonl(CHAT_LINES)
    file_id = upload_file(api, auth, CHAT_LINES)
    assert stored_keys(backend, s3) == [f"files/{file_id}.jsonl"]
    url, size = f"/v1/files/{file_id}/content", len(content)
    etag = f'"{hashlib.sha256(content).hexdigest()}"'

    whole = api.get(url, headers=auth)
    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["content-length"] == str(size) and whole.headers["etag"] == etag
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-disposition"] == 'attachment; filename="train.jsonl"'
    for asked, start, stop in [
        ("bytes=0-9", 0, 10),
        ("bytes=10-", 10, size),
        ("bytes=-5", size - 5, size),
        (f"bytes=5-{size + 100}", 5, size),
    ]:
        part = api.get(url, headers={**auth, "Range": asked})
        assert part.status_code == 206 and part.content == content[start:stop], asked
        assert part.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert part.headers["content-length"] == str(stop - start) and part.headers["etag"] == etag
    past = api.get(url, headers={**auth, "Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert (
        past.json()["error"]["code"] == "range_not_satisfiable" and past.json()["error"]["param"] == "Range"
    )
    # A Range of another version (If-Range), several ranges or another unit: the whole content.
    for headers in [
        {"Range": "bytes=0-9", "If-Range": '"other"'},
        {"Range": "bytes=0-1,4-5"},
        {"Range": "items=0-1"},
    ]:
        assert api.get(url, headers={**auth, **headers}).content == content
    assert api.get(url, headers={**auth, "Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    cached = api.get(url, headers={**auth, "If-None-Match": f"W/{etag}"})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag

    assert api.delete(f"/v1/files/{file_id}", headers=auth).status_code == 200
    assert stored_keys(backend, s3) == []
    assert api.get(url, headers=auth).status_code == 404


def test_the_s3_backend_keeps_nothing_in_the_data_dir(s3_settings, auth, bucket, s3: S3Server) -> None:
    with TestClient(create_app(s3_settings)) as api:
        file_id = upload_file(api, auth, CHAT_LINES)
        body = {"model": "tiny-phi3", "training_file": file_id}
        job_id = api.post("/v1/fine_tuning/jobs", json=body, headers=auth).json()["id"]
        _, attempt = claim(api, job_id)
        assert put_state(api, job_id, attempt, 10, b"state 10").status_code == 200
        adapter = api.put(f"/internal/v1/jobs/{job_id}/adapter", content=tiny_archive(), headers=attempt)
        assert adapter.status_code == 200
    assert [p for p in s3_settings.storage_dir.rglob("*") if p.is_file()] == [], "staged there, then removed"
    kinds = {key.removeprefix(f"{PREFIX}/").split("/")[0] for key in s3.keys(bucket)}
    assert kinds == {"files", "resume", "adapters"}, "all under the prefix"


def test_pruning_deletes_objects(api, auth, backend, s3: S3Server) -> None:
    file_id = upload_file(api, auth, CHAT_LINES)
    body = {
        "model": "tiny-phi3",
        "training_file": file_id,
        "training_config": {"save_steps": 2, "save_total_limit": 2},
    }
    job_id = api.post("/v1/fine_tuning/jobs", json=body, headers=auth).json()["id"]
    _, attempt = claim(api, job_id)
    for step in (2, 4, 6):
        store_checkpoint(api, job_id, attempt, step, tiny_archive() + bytes([step]))
        assert put_state(api, job_id, attempt, step, f"state {step}".encode()).status_code == 200
    adapters = [key for key in stored_keys(backend, s3) if key.startswith(f"adapters/{job_id}/")]
    assert len(adapters) == 2 and not any("/step-2-" in key for key in adapters)  # save_total_limit 2
    states = [key for key in stored_keys(backend, s3) if key.startswith(f"resume/{job_id}/")]
    assert len(states) == 2 and not any("-step-2-" in key for key in states)  # the newest two are kept
    newest = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth).json()["data"][0]
    download = api.get(
        f"/v1/fine_tuning/jobs/{job_id}/adapter", params={"checkpoint": newest["id"]}, headers=auth
    )
    assert download.status_code == 200 and download.content == tiny_archive() + bytes([6])


def test_readyz_checks_the_bucket(s3_settings: Settings) -> None:
    with TestClient(create_app(s3_settings)) as api:
        assert api.get("/readyz").json() == {"status": "ready"}
    missing = s3_settings.model_copy(update={"storage_url": "s3://phitune-no-such-bucket/x"})
    with TestClient(create_app(missing)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503 and set(response.json()["failures"]) == {"storage"}


def test_a_row_whose_blob_is_gone_is_a_404_not_a_500(api: TestClient, auth) -> None:
    file_id = upload_file(api, auth, CHAT_LINES)
    api.app.state.storage.delete(f"files/{file_id}.jsonl")  # lost behind the service's back
    response = api.get(f"/v1/files/{file_id}/content", headers=auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "content_missing"
