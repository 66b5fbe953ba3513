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
