"""The worker's side of /internal/v1: everything a worker learns or reports goes through the API."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# About two minutes in all: a restart of the API, not an outage, which the lease and a retry handle.
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15, 30, 60)
RETRIED_STATUSES = {502, 503, 504}
log = logging.getLogger(__name__)


class ClaimRefused(Exception):
    """The job is no longer queued (cancelled, finished, or claimed by another worker)."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    token: str
    model: str
    training_file: str
    validation_file: str | None
    training_config: dict[str, Any]
    peft_config: dict[str, Any]
    heartbeat_seconds: float


class ApiClient:
    """HTTP client for one worker; `attempt(claim)` gives the client scoped to that job attempt."""

    def __init__(
        self,
        api_url: str,
        worker_token: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=api_url.rstrip("/") + "/internal/v1", timeout=timeout, transport=transport
        )
        self._worker_token = worker_token

    def close(self) -> None:
        self._http.close()

    def claim(self, job_id: str) -> Claim:
        response = self._http.post(f"/jobs/{job_id}/claim", headers=_bearer(self._worker_token))
        if response.status_code == 409:
            raise ClaimRefused(response.json()["error"]["message"])
        response.raise_for_status()
        return Claim(**{k: v for k, v in response.json().items() if k in Claim.__dataclass_fields__})

    def attempt(self, claim: Claim) -> AttemptClient:
        return AttemptClient(self._http, claim)


class AttemptClient:
    """Calls authorised by one attempt's token."""

    def __init__(self, http: httpx.Client, claim: Claim) -> None:
        self._http = http
        self._prefix = f"/jobs/{claim.job_id}"
        self._headers = _bearer(claim.token)

    def download_file(self, file_id: str, destination: Path) -> Path:
        with self._http.stream("GET", f"{self._prefix}/files/{file_id}", headers=self._headers) as response:
            response.raise_for_status()
            with destination.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return destination

    def heartbeat(self) -> bool:
        """Renew the lease; True when the job was cancelled."""
        return self._post("/heartbeat", None)["cancel_requested"]

    def post_events(self, events: list[dict[str, Any]]) -> bool:
        """Record events; True when the job was cancelled."""
        return self._post("/events", {"events": events})["cancel_requested"]

    def upload_adapter(self, archive: Path, fmt: str, *, step: int | None = None) -> dict[str, Any]:
        """Store the final adapter archive in one format, or a checkpoint's when `step` is given."""
        path = f"{self._prefix}/checkpoints/{step}/adapter" if step else f"{self._prefix}/adapter"
        return self._send("PUT", path, params={"format": fmt}, content=archive.read_bytes())

    def publish_checkpoint(self, step: int, metrics: dict[str, Any]) -> None:
        self._post("/checkpoints", {"step": step, "metrics": metrics})

    def complete(self, status: str, *, error: str | None = None, **outcome: Any) -> None:
        """Report the outcome, with trained_tokens, shipped_step and peft_unavailable_reason as known."""
        body: dict[str, Any] = {"status": status, **outcome}
        if error is not None:
            body["error"] = {"message": error[:4000]}
        self._post("/complete", body)

    def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        return self._send("POST", self._prefix + path, json=body)

    def _send(self, method: str, path: str, **request: Any) -> dict[str, Any]:
        """One call, retried while the API cannot be reached or is restarting, so that a redeploy of the API
        does not fail a long training job. Only failures before the API handled the call are retried."""
        for delay in RETRY_DELAYS:
            try:
                response = self._http.request(method, path, headers=self._headers, **request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                log.warning("API unreachable (%s); retrying in %ss", exc, delay)
            else:
                if response.status_code not in RETRIED_STATUSES:
                    response.raise_for_status()
                    return response.json()
                log.warning("API answered %s; retrying in %ss", response.status_code, delay)
            time.sleep(delay)
        response = self._http.request(method, path, headers=self._headers, **request)
        response.raise_for_status()
        return response.json()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
