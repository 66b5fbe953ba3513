"""Liveness and readiness."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_names_an_unreachable_broker(settings):
    settings = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert set(response.json()["failures"]) == {"broker"}


def test_metrics_count_jobs_by_status_and_requests_by_route(client, auth):
    from tests.utils import CHAT_LINES, upload_file

    file_id = upload_file(client, auth, CHAT_LINES)
    for _ in range(2):
        client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
        )
    client.get("/v1/fine_tuning/jobs/ftjob-missing", headers=auth)
    text = client.get("/metrics").text
    assert 'phitune_jobs{status="queued"} ' in text
    queued = float(text.split('phitune_jobs{status="queued"} ')[1].split()[0])
    assert queued >= 2  # the database is shared by this session's tests; this test made two
    assert 'phitune_http_requests_total{method="POST",route="/v1/fine_tuning/jobs",status="200"} 2.0' in text
    assert 'route="/v1/fine_tuning/jobs/{fine_tuning_job_id}",status="404"} 1.0' in text
