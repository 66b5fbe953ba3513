"""The worker's API client rides out an API restart instead of failing the job."""

from __future__ import annotations

import httpx
import pytest

from worker import client as client_module
from worker.client import ApiClient, Claim

CLAIM = Claim("ftjob-1", 1, "1.secret", "tiny-phi3", "file-1", None, {}, {}, 10.0)


def attempt_with(responses: list, monkeypatch: pytest.MonkeyPatch):
    """An attempt client whose transport plays `responses` (exceptions or status codes) in order."""
    monkeypatch.setattr(client_module.time, "sleep", lambda _seconds: None)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        outcome = responses.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, json={"cancel_requested": True})

    api = ApiClient("http://api.invalid", "token")
    api._http = httpx.Client(
        base_url="http://api.invalid/internal/v1", transport=httpx.MockTransport(handler)
    )
    return api.attempt(CLAIM), seen


def test_unreachable_or_restarting_api_is_retried(monkeypatch):
    failures = [httpx.ConnectError("refused"), 503, httpx.ConnectTimeout("slow"), 502]
    attempt, seen = attempt_with([*failures, 200], monkeypatch)
    assert attempt.heartbeat() is True
    assert len(seen) == 5 and all(r.headers["authorization"] == "Bearer 1.secret" for r in seen)


def test_answers_from_the_api_are_not_retried(monkeypatch):
    attempt, seen = attempt_with([409, 200], monkeypatch)
    with pytest.raises(httpx.HTTPStatusError):
        attempt.heartbeat()
    assert len(seen) == 1


def test_gives_up_after_the_last_retry(monkeypatch):
    attempt, seen = attempt_with(
        [httpx.ConnectError("down")] * (len(client_module.RETRY_DELAYS) + 1), monkeypatch
    )
    with pytest.raises(httpx.ConnectError):
        attempt.post_events([])
    assert len(seen) == len(client_module.RETRY_DELAYS) + 1
