"""The worker's side of /internal/v1: everything a worker learns or reports goes through the API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


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

    def __init__(self, api_url: str, worker_token: str, *, timeout: float = 60.0) -> None:
        self._http = httpx.Client(base_url=api_url.rstrip("/") + "/internal/v1", timeout=timeout)
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
        with archive.open("rb") as body:
            response = self._http.put(path, params={"format": fmt}, content=body, headers=self._headers)
        response.raise_for_status()
        return response.json()

    def publish_checkpoint(self, step: int, metrics: dict[str, Any]) -> None:
        self._post("/checkpoints", {"step": step, "metrics": metrics})

    def complete(self, status: str, *, error: str | None = None, **outcome: Any) -> None:
        """Report the outcome, with trained_tokens, shipped_step and peft_unavailable_reason as known."""
        body: dict[str, Any] = {"status": status, **outcome}
        if error is not None:
            body["error"] = {"message": error[:4000]}
        self._post("/complete", body)

    def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        response = self._http.post(self._prefix + path, json=body, headers=self._headers)
        response.raise_for_status()
        return response.json()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
