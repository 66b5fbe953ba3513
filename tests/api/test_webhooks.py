"""Webhooks on a real database, delivered over real HTTP to a local receiver by the API's own sender:
registration and its bounds, the URL rules (SSRF), signatures, retries, the delivery log, and deliveries
written in the transaction of the job's transition."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import Row, delete, update

from app.config import Settings
from app.db import session_scope
from app.errors import ErrorResponse
from app.jobs import states
from app.jobs.leases import MAX_ATTEMPTS, reap_expired_leases
from app.limits import MAX_WEBHOOK_URL_CHARS, MAX_WEBHOOKS_PER_TENANT
from app.main import create_app
from app.models import Job, WebhookDelivery, WebhookEndpoint
from app.repositories import jobs, webhooks
from app.webhooks import signing, url_guard
from app.webhooks.schemas import (
    CreatedWebhook,
    WebhookDeleted,
    WebhookDeliveryList,
    WebhookList,
    WebhookObject,
)
from app.webhooks.sender import KEEP_SETTLED_SECONDS, PER_TENANT, Outcome, WebhookSender, pinned
from tests.api.test_internal import claim, succeeded_job
from tests.api.test_openapi import assert_documented
from tests.utils import CHAT_LINES, upload_file
from tests.webhook_receiver import Receiver, receiving, signature_is_valid, wait_until

CANCELLED, PAUSED = "fine_tuning.job.cancelled", "fine_tuning.job.paused"
SUCCEEDED, FAILED = "fine_tuning.job.succeeded", "fine_tuning.job.failed"
ALL_EVENTS = [SUCCEEDED, FAILED, CANCELLED, PAUSED]


def webhook_settings(settings: Settings, **changes: object) -> Settings:
    """The tests' settings with a fast sender, short retries and loopback receivers allowed."""
    defaults = {
        "webhook_allow_private_urls": True,
        "webhook_poll_seconds": 0.05,
        "webhook_retry_seconds": [0.2, 0.2, 0.2],
        "webhook_timeout_seconds": 5.0,
    }
    return settings.model_copy(update={**defaults, **changes})


@pytest.fixture
def hooks(settings: Settings) -> Iterator[TestClient]:
    """An API client whose app may deliver to loopback receivers (the tests' receivers are local)."""
    with TestClient(create_app(webhook_settings(settings))) as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving(200) as receiver:
        yield receiver


def register(client: TestClient, auth: dict[str, str], url: str, events: list[str] | None = None) -> dict:
    response = client.post("/v1/webhooks", json={"url": url, "events": events or ALL_EVENTS}, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


def queued_job(client: TestClient, auth: dict[str, str]) -> str:
    file_id = upload_file(client, auth, CHAT_LINES)
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def deliveries(client: TestClient, auth: dict[str, str], webhook_id: str) -> list[dict]:
    response = client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def settled(client: TestClient, auth: dict[str, str], webhook_id: str) -> list[dict]:
    """The endpoint's deliveries once none is pending any more."""
    return wait_until(
        lambda: (
            (found := deliveries(client, auth, webhook_id))
            and all(d["status"] != "pending" for d in found)
            and found
        ),
        "settled deliveries",
    )


def test_a_cancelled_job_is_delivered_signed_with_the_job_as_get_renders_it(hooks, auth, receiver):
    hook = register(hooks, auth, receiver.url, [CANCELLED])
    assert hook["secret"].startswith("whsec_") and hook["events"] == [CANCELLED]
    job_id = queued_job(hooks, auth)
    hooks.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)

    (request,) = wait_until(lambda: receiver.received, "delivery")
    assert signature_is_valid(hook["secret"], request)
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert request.headers["content-type"] == "application/json"
    payload = json.loads(request.body)
    assert payload["type"] == CANCELLED and payload["timestamp"].endswith("Z")
    assert payload["data"] == hooks.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert payload["data"]["status"] == "cancelled"

    (delivery,) = settled(hooks, auth, hook["id"])
    assert delivery["id"] == request.headers["webhook-id"]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 1, 200)
    assert delivery["type"] == CANCELLED and delivery["fine_tuning_job_id"] == job_id
    assert delivery["last_error"] is None and delivery["delivered_at"] is not None


def test_a_tampered_body_or_another_secret_fails_verification(hooks, auth, other_auth, receiver):
    hook = register(hooks, auth, receiver.url, [CANCELLED])
    other = register(hooks, other_auth, "http://127.0.0.1:9/", [CANCELLED])
    hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
    (request,) = wait_until(lambda: receiver.received, "delivery")
    tampered = type(request)(request.headers, request.body.replace(b"cancelled", b"succeeded"))
    assert signature_is_valid(hook["secret"], request)
    assert not signature_is_valid(hook["secret"], tampered)
    assert not signature_is_valid(other["secret"], request)


def test_a_failing_receiver_is_retried_with_the_same_webhook_id_until_it_succeeds(hooks, auth):
    with receiving(500, 503, 200) as receiver:
        hook = register(hooks, auth, receiver.url, [CANCELLED])
        hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
        (delivery,) = settled(hooks, auth, hook["id"])
    assert len(receiver.received) == 3
    assert {r.headers["webhook-id"] for r in receiver.received} == {delivery["id"]}
    assert len({r.body for r in receiver.received}) == 1  # the same event, byte for byte
    assert all(signature_is_valid(hook["secret"], r) for r in receiver.received)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 3, 200)


def test_a_delivery_that_keeps_failing_is_given_up_once_the_retries_are_used(settings, auth):
    with (
        receiving(500) as receiver,
        TestClient(create_app(webhook_settings(settings, webhook_retry_seconds=[0.1, 0.1]))) as client,
    ):
        hook = register(client, auth, receiver.url, [CANCELLED])
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        (delivery,) = settled(client, auth, hook["id"])
        time.sleep(0.5)  # no attempt after it failed
    assert len(receiver.received) == 3  # the first attempt and one per wait
    assert (delivery["status"], delivery["attempts"]) == ("failed", 3)
    assert (delivery["last_status_code"], delivery["last_error"]) == (500, "answered HTTP 500")
    assert delivery["next_attempt_at"] is None and delivery["delivered_at"] is None


def test_a_timeout_and_a_redirect_are_failed_attempts(settings, auth):
    no_retries = webhook_settings(settings, webhook_retry_seconds=[], webhook_timeout_seconds=1.0)
    with (
        receiving(307) as redirecting,
        receiving(200, delay=2.5) as slow,
        TestClient(create_app(no_retries)) as client,
    ):
        redirect = register(client, auth, redirecting.url, [CANCELLED])
        late = register(client, auth, slow.url, [CANCELLED])
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        (redirected,) = settled(client, auth, redirect["id"])
        (timed_out,) = settled(client, auth, late["id"])
    assert (redirected["status"], redirected["last_status_code"]) == ("failed", 307)
    assert len(redirecting.received) == 1  # and its Location was not followed
    assert (timed_out["status"], timed_out["last_status_code"]) == ("failed", None)
    assert timed_out["last_error"] == "timed out after 1 s"


def test_succeeded_and_paused_jobs_are_sent_only_to_endpoints_subscribed(hooks, auth):
    with receiving(200) as finished, receiving(200) as paused:
        on_success = register(hooks, auth, finished.url, [SUCCEEDED])
        on_pause = register(hooks, auth, paused.url, [PAUSED, FAILED])
        succeeded = succeeded_job(hooks, auth)  # through the worker routes, as a worker reports it
        pausing = queued_job(hooks, auth)
        hooks.post(f"/v1/fine_tuning/jobs/{pausing}/pause", headers=auth)
        (success,) = settled(hooks, auth, on_success["id"])
        (pause,) = settled(hooks, auth, on_pause["id"])
    assert (success["type"], success["fine_tuning_job_id"]) == (SUCCEEDED, succeeded)
    assert (pause["type"], pause["fine_tuning_job_id"]) == (PAUSED, pausing)
    (done,) = [json.loads(r.body) for r in finished.received]
    assert done["data"]["status"] == "succeeded" and done["data"]["fine_tuned_model"].startswith("ft:")
    # The result file is made before the success's transition, whose webhook carries it.
    job = hooks.get(f"/v1/fine_tuning/jobs/{succeeded}", headers=auth).json()
    assert done["data"]["result_files"] == job["result_files"] and job["result_files"]
    assert [json.loads(r.body)["data"]["status"] for r in paused.received] == ["paused"]


def test_each_landing_is_announced_once_and_resuming_is_not(hooks, auth, receiver):
    """queued → paused → queued → paused → cancelled: paused twice and cancelled, the last from paused."""
    hook = register(hooks, auth, receiver.url)
    job_id = queued_job(hooks, auth)
    for action in ("pause", "resume", "pause", "cancel", "cancel"):
        hooks.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=auth)
    assert [d["type"] for d in settled(hooks, auth, hook["id"])] == [CANCELLED, PAUSED, PAUSED]
    assert [json.loads(r.body)["data"]["status"] for r in receiver.received] == [
        "paused",
        "paused",
        "cancelled",
    ]


def test_a_job_the_housekeeping_loop_fails_is_announced(hooks, auth, database_url, receiver):
    """The lost-lease path commits in the API's background loop, not in a request: the same hook."""
    hook = register(hooks, auth, receiver.url, [FAILED])
    job_id = queued_job(hooks, auth)
    for _ in range(MAX_ATTEMPTS):
        claim(hooks, job_id)
        with session_scope(database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=0))
        reap_expired_leases(database_url)
    (delivery,) = settled(hooks, auth, hook["id"])
    (request,) = receiver.received
    payload = json.loads(request.body)
    assert (delivery["type"], delivery["status"]) == (FAILED, "delivered")
    assert payload["type"] == FAILED and payload["data"]["error"]["code"] == "worker_lost"


def test_a_rolled_back_transition_writes_no_delivery(hooks, auth, database_url):
    hook = register(hooks, auth, "http://127.0.0.1:9/", [CANCELLED])
    job_id = queued_job(hooks, auth)
    with pytest.raises(RuntimeError), session_scope(database_url) as session:
        job = jobs.get(session, job_id)
        assert job is not None and states.transition(session, job, states.Transition.CANCEL_QUEUED)
        raise RuntimeError("the unit of work fails after the transition")
    assert hooks.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    assert deliveries(hooks, auth, hook["id"]) == []
    hooks.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    assert [d["fine_tuning_job_id"] for d in deliveries(hooks, auth, hook["id"])] == [job_id]


def test_an_endpoint_deleted_during_a_transition_waits_for_its_commit(hooks, auth, database_url):
    """On PostgreSQL a delete committed between the transition's read of the endpoints and its commit would
    break the deliveries' foreign key, and the transition with it (on SQLite the one writer waits anyway)."""
    hook = register(hooks, auth, "http://127.0.0.1:9/", [CANCELLED])
    job_id = queued_job(hooks, auth)

    def delete_endpoint() -> None:
        with session_scope(database_url) as session:
            session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == hook["id"]))

    with ThreadPoolExecutor(1) as pool:
        with session_scope(database_url) as session:
            job = jobs.get(session, job_id)
            assert job is not None and states.transition(session, job, states.Transition.CANCEL_QUEUED)
            deleting = pool.submit(delete_endpoint)
            time.sleep(0.5)  # long enough for the delete to commit, were it not held
        deleting.result()
    assert hooks.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    assert hooks.get(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 404


def test_an_address_that_turned_private_is_refused_at_send_time(settings, auth, receiver):
    """As a name rebound to a private address would be: registered while allowed, sent once not."""
    with TestClient(create_app(webhook_settings(settings))) as client:
        hook = register(client, auth, receiver.url, [CANCELLED])
    strict = webhook_settings(settings, webhook_allow_private_urls=False, webhook_retry_seconds=[60.0])
    with TestClient(create_app(strict)) as client:
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        (delivery,) = wait_until(
            lambda: [d for d in deliveries(client, auth, hook["id"]) if d["last_error"]], "a refused attempt"
        )
        gauge = next(
            line
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("phitune_webhook_deliveries_pending ")
        )
    assert receiver.received == []
    assert delivery["status"] == "pending" and delivery["last_error"].startswith("refused: ")
    assert "127.0.0.1" in delivery["last_error"] and delivery["next_attempt_at"] > time.time() + 30
    assert float(gauge.split()[1]) >= 1


REFUSED_URLS = [
    "http://127.0.0.1/hook",
    "http://127.0.0.1:8000/v1/files",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.10/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[2002:7f00:1::]/",  # 6to4 around 127.0.0.1
    "http://[64:ff9b::a00:1]/",  # NAT64 around 10.0.0.1
    "http://[fec0::1]/",  # site-local
    "http://0x7f000001/",
    "http://2130706433/",
    "http://017700000001/",
    "http://127.1/",
    "http://localhost:8000/",
    "http://LOCALHOST./",
    "ftp://8.8.8.8/",
    "file:///etc/passwd",
    "gopher://8.8.8.8/",
    "javascript:alert(1)",
    "https://user:secret@8.8.8.8/",
    "https://token@8.8.8.8/",
    "not a url",
    "http:///path",
    "http://8.8.8.8:99999/",
    "http://[fe80::1%25eth0]/",
    "http://8.8.8.8/\nHost: evil",
    "http://no-such-host.invalid/",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_urls_of_private_or_non_http_targets_are_refused(client, auth, url):
    response = client.post("/v1/webhooks", json={"url": url, "events": [CANCELLED]}, headers=auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"
    assert response.json()["error"]["code"] == "invalid_url"
    assert client.get("/v1/webhooks", headers=auth).json()["data"] == []


def test_a_refused_name_does_not_tell_what_it_resolves_to(client, auth):
    """The API's resolver sees its own network: a tenant must not learn its addresses through the refusal."""
    response = client.post(
        "/v1/webhooks", json={"url": "http://localhost:8000/", "events": [CANCELLED]}, headers=auth
    )
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "'localhost' resolves to a loopback" in message
    assert "127.0.0.1" not in message and "::1" not in message


def test_public_addresses_are_accepted(client, auth):
    for url in ("https://8.8.8.8/hooks/phitune?x=1", "http://[2001:4860:4860::8888]:8443/"):
        assert register(client, auth, url)["url"] == url


def test_the_operator_may_allow_private_urls_but_not_other_schemes_or_credentials(hooks, auth):
    for url in ("http://127.0.0.1:9/hook", "http://localhost/", "http://[::1]/", "http://10.0.0.2:8080/"):
        assert register(hooks, auth, url)["url"] == url
    for url in ("file:///etc/passwd", "http://user:pw@127.0.0.1/"):
        response = hooks.post("/v1/webhooks", json={"url": url, "events": [CANCELLED]}, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["param"] == "url"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"events": [CANCELLED]}, "url"),
        ({"url": 5, "events": [CANCELLED]}, "url"),
        ({"url": "", "events": [CANCELLED]}, "url"),
        ({"url": "http://127.0.0.1/" + "a" * MAX_WEBHOOK_URL_CHARS, "events": [CANCELLED]}, "url"),
        ({"url": "http://127.0.0.1/\ud800", "events": [CANCELLED]}, "url"),
        ({"url": "http://127.0.0.1/"}, "events"),
        ({"url": "http://127.0.0.1/", "events": []}, "events"),
        ({"url": "http://127.0.0.1/", "events": CANCELLED}, "events"),
        ({"url": "http://127.0.0.1/", "events": ["fine_tuning.job.created"]}, "events.0"),
        ({"url": "http://127.0.0.1/", "events": [CANCELLED, None]}, "events.1"),
        ({"url": "http://127.0.0.1/", "events": [CANCELLED], "secret": "whsec_mine"}, "secret"),
    ],
)
def test_bad_requests_are_400_naming_the_field(hooks, auth, body, param):
    # Sent as JSON spells it (a lone surrogate as an escape), which a client's encoder would refuse.
    headers = {**auth, "content-type": "application/json"}
    response = hooks.post("/v1/webhooks", content=json.dumps(body), headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_tenant_has_at_most_the_limit_of_webhooks(hooks, auth):
    for number in range(MAX_WEBHOOKS_PER_TENANT):
        register(hooks, auth, f"http://127.0.0.1:9/{number}")
    response = hooks.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/one-more", "events": [CANCELLED]}, headers=auth
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_webhooks"
    hook = hooks.get("/v1/webhooks?limit=1", headers=auth).json()["data"][0]
    hooks.delete(f"/v1/webhooks/{hook['id']}", headers=auth)
    register(hooks, auth, "http://127.0.0.1:9/one-more")


def test_list_get_delete_and_the_secret_shown_once(hooks, auth):
    first = register(hooks, auth, "http://127.0.0.1:9/a", [CANCELLED, CANCELLED, PAUSED])
    second = register(hooks, auth, "http://127.0.0.1:9/b")
    assert first["events"] == [CANCELLED, PAUSED] and first["secret"] != second["secret"]
    listed = hooks.get("/v1/webhooks", headers=auth).json()
    assert [h["id"] for h in listed["data"]] == [second["id"], first["id"]]  # newest first
    shown = hooks.get(f"/v1/webhooks/{first['id']}", headers=auth).json()
    assert shown == {k: v for k, v in first.items() if k != "secret"}
    assert all("secret" not in h for h in listed["data"])
    deleted = hooks.delete(f"/v1/webhooks/{first['id']}", headers=auth)
    assert deleted.json() == {"id": first["id"], "object": "webhook_endpoint", "deleted": True}
    assert hooks.get(f"/v1/webhooks/{first['id']}", headers=auth).status_code == 404
    assert [h["id"] for h in hooks.get("/v1/webhooks", headers=auth).json()["data"]] == [second["id"]]


def test_a_deleted_webhook_is_sent_nothing_more(settings, auth):
    with (
        receiving(500) as receiver,
        TestClient(create_app(webhook_settings(settings, webhook_retry_seconds=[0.5]))) as client,
    ):
        hook = register(client, auth, receiver.url, [CANCELLED])
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        wait_until(lambda: receiver.received, "a first attempt")
        assert client.delete(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 200
        time.sleep(1.5)  # past the retry's wait
    assert len(receiver.received) == 1


def test_another_tenants_webhook_is_404(hooks, auth, other_auth):
    hook = register(hooks, auth, "http://127.0.0.1:9/")
    for method, path in [
        ("GET", f"/v1/webhooks/{hook['id']}"),
        ("DELETE", f"/v1/webhooks/{hook['id']}"),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
        ("GET", "/v1/webhooks/wh-doesnotexist"),
    ]:
        response = hooks.request(method, path, headers=other_auth)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "webhook_not_found"
    assert hooks.get("/v1/webhooks", headers=other_auth).json()["data"] == []
    assert hooks.get(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 200


def test_another_tenants_job_is_not_announced_to_this_tenant(hooks, auth, other_auth):
    hook = register(hooks, auth, "http://127.0.0.1:9/", [CANCELLED])
    hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, other_auth)}/cancel", headers=other_auth)
    assert deliveries(hooks, auth, hook["id"]) == []


def test_webhook_routes_need_a_key(client):
    assert client.get("/v1/webhooks").status_code == 401
    assert client.post("/v1/webhooks", json={}).status_code == 401


def test_webhook_objects_and_errors_validate_against_the_published_schema(hooks, auth, receiver):
    openapi = hooks.get("/openapi.json").json()
    one, deliveries_path = "/v1/webhooks/{webhook_id}", "/v1/webhooks/{webhook_id}/deliveries"
    created = hooks.post("/v1/webhooks", json={"url": receiver.url, "events": [CANCELLED]}, headers=auth)
    hook = assert_documented(openapi, created, "post", "/v1/webhooks", CreatedWebhook)
    hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
    settled(hooks, auth, hook["id"])
    checks = [
        ("get", "/v1/webhooks", hooks.get("/v1/webhooks", headers=auth), WebhookList),
        ("get", one, hooks.get(f"/v1/webhooks/{hook['id']}", headers=auth), WebhookObject),
        (
            "get",
            deliveries_path,
            hooks.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=auth),
            WebhookDeliveryList,
        ),
        ("get", one, hooks.get("/v1/webhooks/wh-nope", headers=auth), ErrorResponse),
        ("post", "/v1/webhooks", hooks.post("/v1/webhooks", json={"url": "x"}, headers=auth), ErrorResponse),
        (
            "get",
            deliveries_path,
            hooks.get(f"/v1/webhooks/{hook['id']}/deliveries?after=x", headers=auth),
            ErrorResponse,
        ),
        ("delete", one, hooks.delete(f"/v1/webhooks/{hook['id']}", headers=auth), WebhookDeleted),
    ]
    for method, path, response, model in checks:
        body = assert_documented(openapi, response, method, path, model)
        assert list(body) == list(model.model_fields), path


def test_a_checked_address_is_what_the_sender_connects_to_with_the_name_as_host(settings, receiver):
    """The sender connects to the address it checked, not to whatever the name resolves to at connect time:
    here a name that resolves nowhere, reached at the receiver's address, and still sent as `Host`."""
    port = httpx.URL(receiver.url).port
    url = httpx.URL(f"http://hooks.phitune.invalid:{port}/hook")
    sender = WebhookSender(settings)
    row = SimpleNamespace(id="msg-1", secret=signing.new_secret(), body='{"type":"x"}')
    assert sender.send(row, *pinned(url, ipaddress.ip_address("127.0.0.1"))) == 200
    (request,) = receiver.received
    assert request.headers["host"] == f"hooks.phitune.invalid:{port}" and request.body == b'{"type":"x"}'
    assert signature_is_valid(row.secret, request)
    tls_url, headers, extensions = pinned(
        httpx.URL("https://hooks.example/x"), ipaddress.ip_address("2001:db8::1")
    )
    assert (str(tls_url), headers, extensions) == (
        "https://[2001:db8::1]/x",
        {"host": "hooks.example"},
        {"sni_hostname": "hooks.example"},
    )


def test_an_attempt_connects_to_the_address_it_checked_not_to_a_new_resolution(
    settings, receiver, monkeypatch
):
    """The name is resolved once per attempt, by the check: were the connection to resolve it again, a name
    rebound in between (DNS rebinding) would be reached unchecked. Here the check's resolution is the only
    one that knows the name."""
    port = httpx.URL(receiver.url).port
    monkeypatch.setattr(url_guard, "resolve", lambda url: [ipaddress.ip_address("127.0.0.1")])
    monkeypatch.setattr(url_guard, "is_public", lambda address: True)
    sender = WebhookSender(webhook_settings(settings, webhook_allow_private_urls=False))
    row = SimpleNamespace(
        id="msg-1", url=f"http://hooks.phitune.invalid:{port}/hook", secret=signing.new_secret(), body="{}"
    )
    assert sender.post(row) == Outcome(200, None)
    (request,) = receiver.received
    assert request.headers["host"] == f"hooks.phitune.invalid:{port}"


def test_the_outcome_of_an_attempt_whose_claim_lapsed_is_not_recorded(settings, auth, database_url):
    """A slow attempt whose claim lapsed was claimed again: only the newer attempt's outcome counts."""
    with TestClient(create_app(webhook_settings(settings, webhook_poll_seconds=3600))) as client:
        hook = register(client, auth, "http://127.0.0.1:9/", [CANCELLED])
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        (pending,) = deliveries(client, auth, hook["id"])
        delivered = {"status": WebhookDelivery.DELIVERED, "last_status_code": 200}

        def claim(lease_seconds: float) -> Row:  # the other tests' deliveries still pending may come too
            with session_scope(database_url) as session:
                claimed = webhooks.claim_due(session, time.time(), time.time() + lease_seconds, 8)
            return next(row for row in claimed if row.id == pending["id"])

        first, second = claim(0), claim(60)  # the first claim lapses at once
        assert (first.attempts, second.attempts) == (1, 2)
        with session_scope(database_url) as session:
            assert not webhooks.record_attempt(session, first.id, first.attempts, delivered)
            assert webhooks.record_attempt(
                session, second.id, second.attempts, {"last_error": "answered 500"}
            )
        (delivery,) = deliveries(client, auth, hook["id"])
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == (
        "pending",
        2,
        "answered 500",
    )


def test_two_senders_claim_each_delivery_once(settings, auth, receiver):
    """As two API processes would: both poll the same rows at once, and each delivery is sent once."""
    quiet = webhook_settings(settings, webhook_poll_seconds=3600)  # the app's own sender stays out of it
    with TestClient(create_app(quiet)) as client:
        for number in range(MAX_WEBHOOKS_PER_TENANT):
            register(client, auth, f"{receiver.url}/{number}", [CANCELLED])
        client.post(f"/v1/fine_tuning/jobs/{queued_job(client, auth)}/cancel", headers=auth)
        senders = [WebhookSender(quiet), WebhookSender(quiet)]
        with ThreadPoolExecutor(2) as pool:
            while sum(pool.map(lambda sender: len(wait(sender.dispatch()).done), senders)):
                pass
    ids = [request.headers["webhook-id"] for request in receiver.received]
    assert len(ids) == MAX_WEBHOOKS_PER_TENANT and len(set(ids)) == len(ids)


def test_a_tenant_whose_endpoints_hang_holds_its_slots_only(hooks, auth, other_auth):
    """16 endpoints that take longer than a round would have all of a process's slots; a tenant gets
    PER_TENANT of them, and another tenant's delivery is sent at once, not after the hanging ones."""
    with receiving(200, delay=4) as hanging, receiving(200) as quick:
        for number in range(MAX_WEBHOOKS_PER_TENANT):
            register(hooks, auth, f"{hanging.url}/{number}", [CANCELLED])
        hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
        wait_until(lambda: len(hanging.received) >= PER_TENANT, "the hanging endpoints' first attempts")
        started = time.monotonic()
        register(hooks, other_auth, quick.url, [CANCELLED])
        hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, other_auth)}/cancel", headers=other_auth)
        wait_until(lambda: quick.received, "the other tenant's delivery")
        waited, hanging_in_flight = time.monotonic() - started, len(hanging.received)
    assert waited < 3 and hanging_in_flight == PER_TENANT


@contextmanager
def trickling() -> Iterator[str]:
    """An endpoint that starts its answer, then sends one more byte of its headers every 0.2 s for 10 s:
    every read gets something well within any timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection, contextlib.suppress(OSError):
            connection.sendall(b"HTTP/1.1 200 OK\r\nx-slow: ")
            for _ in range(50):
                if stop.wait(0.2):
                    return
                connection.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        server.close()


def test_an_endpoint_that_trickles_its_answer_is_cut_off_at_the_timeout(settings):
    sender = WebhookSender(webhook_settings(settings, webhook_timeout_seconds=1.0))
    with trickling() as url:
        row = SimpleNamespace(id="msg-1", url=url, secret=signing.new_secret(), body="{}", tenant_id="t")
        started = time.monotonic()
        outcome = sender.post(row)
    assert time.monotonic() - started < 3
    assert outcome == Outcome(None, "timed out after 1 s")


def certificate_authority(*names: str) -> tuple[str, ssl.SSLContext]:
    """A CA's certificate (PEM) and a server context with a certificate it signed for `names`."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: x509.Name, signer, extension: x509.ExtensionType):
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
            .sign(signer, hashes.SHA256())
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phitune test CA")])
    ca = certificate(
        "phitune test CA", ca_key, ca_name, ca_key, x509.BasicConstraints(ca=True, path_length=0)
    )
    names_extension = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
    leaf = certificate(names[0], key, ca_name, ca_key, names_extension)
    with tempfile.TemporaryDirectory() as directory:
        chain, key_file = Path(directory, "chain.pem"), Path(directory, "key.pem")
        chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(chain, key_file)
    return ca.public_bytes(serialization.Encoding.PEM).decode(), server


def test_a_pinned_https_attempt_verifies_the_certificate_for_the_name(settings):
    """Connecting to the checked address must not skip TLS verification: the certificate is checked against
    the URL's name (sent as SNI), so one for another name is refused."""
    ca, server_context = certificate_authority("hooks.example")
    sender = WebhookSender(settings)
    trusting_the_ca = ssl.create_default_context(cadata=ca)
    sender.__dict__["client"] = httpx.Client(verify=trusting_the_ca, follow_redirects=False, trust_env=False)
    row = SimpleNamespace(id="msg-1", secret=signing.new_secret(), body="{}")
    loopback = ipaddress.ip_address("127.0.0.1")
    with receiving(200, tls=server_context) as receiver:
        port = httpx.URL(receiver.url).port
        assert sender.send(row, *pinned(httpx.URL(f"https://hooks.example:{port}/x"), loopback)) == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            sender.send(row, *pinned(httpx.URL(f"https://other.example:{port}/x"), loopback))
    (request,) = receiver.received
    assert request.headers["host"] == f"hooks.example:{port}" and signature_is_valid(row.secret, request)


def test_settled_deliveries_are_forgotten_after_the_retention_and_pending_ones_kept(
    hooks, settings, auth, database_url, receiver
):
    hook = register(hooks, auth, receiver.url, [CANCELLED])
    for _ in range(2):
        hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
    delivered, still_pending = [d["id"] for d in settled(hooks, auth, hook["id"])]
    with session_scope(database_url) as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([delivered, still_pending]))
            .values(created_at=int(time.time() - KEEP_SETTLED_SECONDS - 60))
        )
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == still_pending)
            .values(status=WebhookDelivery.PENDING, next_attempt_at=time.time() + 3600)
        )
    hooks.post(f"/v1/fine_tuning/jobs/{queued_job(hooks, auth)}/cancel", headers=auth)
    (fresh,) = wait_until(
        lambda: [
            d["id"]
            for d in deliveries(hooks, auth, hook["id"])
            if d["status"] == "delivered" and d["id"] != delivered
        ],
        "a new delivery",
    )
    WebhookSender(settings).prune()
    assert [d["id"] for d in deliveries(hooks, auth, hook["id"])] == [fresh, still_pending]
