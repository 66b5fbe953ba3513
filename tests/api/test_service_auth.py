"""Service-to-service credentials against a real `phitune api` process serving /internal/v1 on its own port
(PHITUNE_INTERNAL_PORT), over real HTTP: each secret opens only its own routes, attempt tokens are verified
before anything about the job is revealed, and the internal routes are not on the public port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.jobs.leases import reap_expired_leases
from app.models import Job
from phitune.launch import free_port, run_phitune, running
from tests.utils import CHAT_LINES, jsonl

WORKER = {"Authorization": "Bearer auth-test-worker-token"}
SERVING = {"Authorization": "Bearer auth-test-serving-token"}
INFERENCE = {"Authorization": "Bearer auth-test-inference-token"}


class Api:
    def __init__(self, public: str, internal: str, key: str, database_url: str) -> None:
        self.public = httpx.Client(base_url=public, timeout=30)
        self.internal = httpx.Client(base_url=internal, timeout=30)
        self.auth = {"Authorization": f"Bearer {key}"}
        self.database_url = database_url

    def new_job(self) -> str:
        file_id = self.public.post(
            "/v1/files",
            files={"file": ("train.jsonl", jsonl(CHAT_LINES), "application/jsonl")},
            data={"purpose": "fine-tune"},
            headers=self.auth,
        ).json()["id"]
        job = self.public.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=self.auth
        )
        assert job.status_code == 200, job.text
        return job.json()["id"]

    def claim(self, job_id: str) -> dict[str, str]:
        claimed = self.internal.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER)
        assert claimed.status_code == 200, claimed.text
        return {"Authorization": f"Bearer {claimed.json()['token']}"}

    def lose_lease(self, job_id: str) -> None:
        """The worker of `job_id` went silent: its lease expires and the job is queued again."""
        with session_scope(self.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
        reap_expired_leases(self.database_url)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("service-auth")
    port, internal_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_BROKER_URL": "memory://",  # nobody trains: job messages go nowhere
        "PHITUNE_INTERNAL_PORT": str(internal_port),
        "PHITUNE_WORKER_TOKEN": WORKER["Authorization"].split()[1],
        "PHITUNE_SERVING_TOKEN": SERVING["Authorization"].split()[1],
        "PHITUNE_INFERENCE_TOKEN": INFERENCE["Authorization"].split()[1],
    }
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "auth", env=env).strip().splitlines()[-1]
    public, internal = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{internal_port}"
    with running(["api", "--port", str(port)], public, env=env):
        yield Api(public, internal, key, Settings(data_dir=data_dir).resolved_database_url)


def assert_401(response: httpx.Response) -> dict:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and set(error) == {"message", "type", "param", "code"}
    return response.json()


def test_internal_routes_are_served_only_on_the_internal_port(api: Api) -> None:
    job_id = api.new_job()
    on_public = api.public.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER)
    assert on_public.status_code == 404 and on_public.json()["error"]["message"] == "Not Found"
    assert api.public.get("/internal/v1/adapters/anything", headers=SERVING).status_code == 404
    api.claim(job_id)  # the same call on the internal port
    # The internal port answers nothing public, whatever the credentials.
    for path in ("/v1/models", "/v1/files", "/openapi.json", "/docs"):
        assert api.internal.get(path, headers=api.auth).status_code == 404, path
    assert api.public.get("/v1/models", headers=api.auth).status_code == 200
    for client in (api.public, api.internal):
        assert client.get("/healthz").json() == {"status": "ok"}
    # Job counts across tenants are the operator's: /metrics on the internal port only.
    assert api.public.get("/metrics").status_code == 404
    assert "phitune_http_requests" in api.internal.get("/metrics").text


def test_the_worker_token_only_claims(api: Api) -> None:
    running_job, queued_job = api.new_job(), api.new_job()
    attempt = api.claim(running_job)
    assert_401(api.internal.get(f"/internal/v1/adapters/{running_job}", headers=WORKER))
    assert_401(api.internal.post(f"/internal/v1/jobs/{running_job}/heartbeat", headers=WORKER))
    for path in ("/v1/models", "/v1/files", "/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{running_job}"):
        assert_401(api.public.get(path, headers=WORKER))
    # Nor does any other service credential claim.
    for other in (SERVING, INFERENCE, attempt, api.auth):
        assert_401(api.internal.post(f"/internal/v1/jobs/{queued_job}/claim", headers=other))


def test_the_serving_token_only_downloads_adapters(api: Api) -> None:
    job_id = api.new_job()
    attempt = api.claim(job_id)
    # A known id that has no servable adapter yet: past the credential check, the route's own 404.
    missing = api.internal.get(f"/internal/v1/adapters/{job_id}", headers=SERVING)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert_401(api.internal.get(f"/internal/v1/adapters/{job_id}", headers=attempt))
    assert_401(api.internal.get(f"/internal/v1/adapters/{job_id}", headers=INFERENCE))
    assert_401(api.internal.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=SERVING))
    assert_401(api.public.get("/v1/models", headers=SERVING))


def test_an_attempt_token_opens_only_its_own_job(api: Api) -> None:
    first, second = api.new_job(), api.new_job()
    first_attempt, second_attempt = api.claim(first), api.claim(second)
    assert api.internal.post(f"/internal/v1/jobs/{first}/heartbeat", headers=first_attempt).status_code == 200
    assert_401(api.internal.post(f"/internal/v1/jobs/{second}/heartbeat", headers=first_attempt))
    assert_401(api.internal.post(f"/internal/v1/jobs/{first}/heartbeat", headers=second_attempt))
    for path in ("/v1/models", f"/v1/fine_tuning/jobs/{first}"):
        assert_401(api.public.get(path, headers=first_attempt))


def test_forged_attempt_tokens_get_one_answer_for_known_and_unknown_jobs(api: Api) -> None:
    job_id = api.new_job()
    genuine = api.claim(job_id)
    api.lose_lease(job_id)
    api.claim(job_id)  # attempt 2 runs; attempt 1 is superseded
    forged_tokens = [
        "1."
        + "A" * 43,  # a superseded attempt's number: was 409 attempt_superseded before the token was checked
        "2." + "A" * 43,  # the running attempt's number
        "7." + "A" * 43,
        "².abc",  # a superscript digit: str.isdigit() takes it, int() does not (was a 500)
        "١.abc",  # an Arabic-Indic digit
        "01.abc",
        "1",
        "1.",
        ".abc",
        "9" * 40 + ".abc",
        "1.abc def",
    ]
    bodies = set()
    for token in forged_tokens:
        headers = {"Authorization": f"Bearer {token}".encode()}  # as bytes: a header may carry any Latin-1
        for job in (job_id, "ftjob-doesnotexist"):
            for method, path in (("POST", "heartbeat"), ("GET", f"files/{job}"), ("PUT", "adapter")):
                response = api.internal.request(method, f"/internal/v1/jobs/{job}/{path}", headers=headers)
                bodies.add(str(assert_401(response)))
    assert len(bodies) == 1, bodies
    # Only the genuine token of the superseded attempt learns that it was superseded (and stops).
    stale = api.internal.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=genuine)
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "attempt_superseded"


def test_malformed_service_credentials_are_401_not_500(api: Api) -> None:
    job_id = api.new_job()
    for value in (b"Bearer \xb2", b"Bearer", b"Basic abc", b"bearer \xe9", b""):
        headers = {"Authorization": value}
        assert_401(api.internal.post(f"/internal/v1/jobs/{job_id}/claim", headers=headers))
        assert_401(api.internal.get(f"/internal/v1/adapters/{job_id}", headers=headers))
        assert_401(api.internal.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=headers))


def test_settings_refuse_one_secret_for_two_purposes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must all differ"):
        Settings(data_dir=tmp_path, worker_token="same-secret-twice", serving_token="same-secret-twice")
    generated = Settings(data_dir=tmp_path)
    secrets = {generated.resolved_worker_token, generated.resolved_serving_token}
    secrets |= {generated.resolved_inference_token, generated.resolved_attempt_key}
    assert len(secrets) == 4
    assert Settings(data_dir=tmp_path).resolved_serving_token == generated.resolved_serving_token  # kept
