"""The worker's API client rides out an API restart instead of failing the job, and gives up once the API
has been silent for longer than the lease."""

from __future__ import annotations

import httpx
import pytest

from app.internal.contracts import ClaimReply
from worker import client as client_module
from worker.client import ApiClient

CLAIM = ClaimReply(
    job_id="ftjob-1",
    attempt=1,
    token="1.secret",
    model="tiny-phi3",
    training_file="file-1",
    validation_file=None,
    training_config={},
    peft_config={},
    heartbeat_seconds=10.0,
    lease_seconds=120.0,
)


class FakeClock:
    """time.monotonic and time.sleep for the client: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def attempt_with(responses: list, monkeypatch: pytest.MonkeyPatch):
    """An attempt client whose transport plays `responses` (exceptions or status codes) in order."""
    monkeypatch.setattr(client_module, "time", FakeClock())
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        outcome = responses.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, json={"cancel_requested": True, "pause_requested": False})

    api = ApiClient("http://api.invalid", "token")
    api._http = httpx.Client(
        base_url="http://api.invalid/internal/v1", transport=httpx.MockTransport(handler)
    )
    return api.attempt(CLAIM), seen


def test_unreachable_or_restarting_api_is_retried(monkeypatch):
    failures = [
        httpx.ConnectError("refused"),
        503,
        httpx.ReadTimeout("slow"),
        502,
        httpx.RemoteProtocolError("x"),
    ]
    attempt, seen = attempt_with([*failures, 200], monkeypatch)
    assert attempt.heartbeat().cancel_requested is True
    assert len(seen) == 6 and all(r.headers["authorization"] == "Bearer 1.secret" for r in seen)


def test_answers_from_the_api_are_not_retried(monkeypatch):
    attempt, seen = attempt_with([409, 200], monkeypatch)
    with pytest.raises(httpx.HTTPStatusError):
        attempt.heartbeat()
    assert len(seen) == 1


def test_gives_up_once_the_api_was_silent_for_longer_than_the_lease(monkeypatch):
    attempt, seen = attempt_with([httpx.ConnectError("down")] * 100, monkeypatch)
    with pytest.raises(client_module.LeaseLost):
        attempt.post_events([])
    clock = client_module.time
    assert CLAIM.lease_seconds < clock.now <= CLAIM.lease_seconds + max(client_module.RETRY_DELAYS)
    assert 10 < len(seen) < 20  # backed off, not hammering


def test_a_claim_is_retried_while_the_api_restarts_and_refused_when_not_queued(monkeypatch):
    monkeypatch.setattr(client_module, "time", FakeClock())
    replies = [httpx.ConnectError("refused"), 503, 200, 409]

    def handler(request: httpx.Request) -> httpx.Response:
        outcome = replies.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == 409:
            return httpx.Response(409, json={"error": {"message": "Job is running, not queued", "code": "x"}})
        return httpx.Response(outcome, json=CLAIM.model_dump())

    api = ApiClient("http://api.invalid", "token", transport=httpx.MockTransport(handler))
    assert api.claim("ftjob-1") == CLAIM
    with pytest.raises(client_module.ClaimRefused, match="not queued"):
        api.claim("ftjob-1")
    assert replies == []
