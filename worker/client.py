"""The worker's side of /internal/v1: everything a worker learns or reports goes through the API."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import tenacity
from pydantic import BaseModel

from app.adapter_format import FORMAT_HEADER
from app.internal.contracts import (
    CheckpointReport,
    ClaimReply,
    ExportClaimReply,
    ExportFailure,
    ExportLease,
    ExportReceipt,
    LeaseReply,
    Outcome,
    StateReceipt,
    WorkerError,
    WorkerEvents,
)
from app.service_auth import bearer

# Delays between retries of a call the API did not answer; the last one repeats until the lease is lost.
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)
RETRIED_STATUSES = {502, 503, 504}
JSON_CONTENT = {"Content-Type": "application/json"}
UPLOAD_CHUNK_BYTES = 1 << 20
log = logging.getLogger(__name__)
T = TypeVar("T")


# How long a claim is retried while the API restarts; the message is re-sent later if it gives up.
CLAIM_RETRY_SECONDS = 120


class ApiUnreachable(Exception):
    """The API did not answer a call for longer than the call may wait."""


class LeaseLost(ApiUnreachable):
    """The API has not answered for longer than the lease: the job has been (or is being) handed to a new
    attempt, so this one must stop training."""


class ClaimRefused(Exception):
    """The job is no longer queued (cancelled, finished, or claimed by another worker)."""


def internal_http(api_url: str, timeout: float, transport: httpx.BaseTransport | None) -> httpx.Client:
    """An HTTP client of the API's /internal/v1."""
    return httpx.Client(base_url=api_url.rstrip("/") + "/internal/v1", timeout=timeout, transport=transport)


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
        self._http = internal_http(api_url, timeout, transport)
        self._worker_token = worker_token

    def close(self) -> None:
        self._http.close()

    def claim(self, job_id: str) -> ClaimReply:
        """Start an attempt, retried while the API restarts. ClaimRefused when the job is not queued (a repeat
        of a claim that committed but whose reply was lost is refused too; the lease recovers that job)."""
        response = _retrying(
            lambda: _answered(self._http.post(f"/jobs/{job_id}/claim", headers=bearer(self._worker_token))),
            CLAIM_RETRY_SECONDS,
            ApiUnreachable,
        )
        if response.status_code == 409:
            raise ClaimRefused(response.json()["error"]["message"])
        response.raise_for_status()
        return ClaimReply.model_validate(response.json())

    def attempt(self, claim: ClaimReply) -> AttemptClient:
        return AttemptClient(self._http, claim)


class AttemptClient:
    """Calls authorised by one attempt's token."""

    def __init__(self, http: httpx.Client, claim: ClaimReply) -> None:
        self._http = http
        self._prefix = f"/jobs/{claim.job_id}"
        self._headers = bearer(claim.token)
        self._lease_seconds = claim.lease_seconds

    def download_file(self, file_id: str, destination: Path) -> Path:
        return self._download(f"{self._prefix}/files/{file_id}", destination)

    def download_resume_state(self, state_id: str, destination: Path) -> Path:
        return self._download(f"{self._prefix}/resume_states/{state_id}", destination)

    def download_init_adapter(self, destination: Path) -> Path:
        """The adapter archive of training_config.init_from, in the format of the job's backend."""
        return self._download(f"{self._prefix}/init_from", destination)

    def heartbeat(self) -> LeaseReply:
        """Renew the lease; the reply says whether the job was cancelled or paused meanwhile."""
        return LeaseReply.model_validate(self._post("/heartbeat", None))

    def post_events(self, events: list[dict[str, Any]]) -> LeaseReply:
        """Record events (numbered by `seq`, so a retried post stores each once); renews the lease too."""
        return LeaseReply.model_validate(self._post("/events", WorkerEvents(events=events)))

    def upload_resume_state(self, archive: Path, step: int, sha256: str) -> StateReceipt:
        """Store a resume state; the API keeps it only if what arrived has this sha256."""
        # Bytes, not a file object: a retried request must send the whole body again.
        reply = self._send(
            "PUT",
            f"{self._prefix}/resume_states",
            params={"step": step, "sha256": sha256},
            content=archive.read_bytes(),
        )
        return StateReceipt.model_validate(reply)

    def upload_adapter(self, archive: Path, fmt: str, *, step: int | None = None) -> dict[str, Any]:
        """Store the final adapter archive in one format, or a checkpoint's when `step` is given."""
        path = f"{self._prefix}/checkpoints/{step}/adapter" if step else f"{self._prefix}/adapter"
        return self._send("PUT", path, params={"format": fmt}, content=archive.read_bytes())

    def publish_checkpoint(self, step: int, metrics: dict[str, Any]) -> None:
        self._post("/checkpoints", CheckpointReport(step=step, metrics=metrics))

    def complete(self, status: str, *, error: str | None = None, **outcome: Any) -> None:
        """Report the outcome, with trained_tokens, shipped_step and peft_unavailable_reason as known."""
        if error is not None:
            outcome["error"] = WorkerError(message=error[:4000])
        self._post("/complete", Outcome(status=status, **outcome))

    def _download(self, path: str, destination: Path) -> Path:
        """Stream a file to `destination`, retried as `_send` retries (a restart mid-download starts over)."""

        def once() -> Path:
            with self._http.stream("GET", path, headers=self._headers) as response:
                _answered(response).raise_for_status()
                with destination.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            return destination

        return _retrying(once, self._lease_seconds, LeaseLost)

    def _post(self, path: str, body: BaseModel | None) -> dict[str, Any]:
        """POST a body of the contract, as given (unset fields stay unsent). Serialised by pydantic, which
        writes a non-finite float (the loss of a diverged run) as null: httpx refuses to encode one."""
        if body is None:
            return self._send("POST", self._prefix + path)
        content = body.model_dump_json(exclude_unset=True)
        return self._send("POST", self._prefix + path, content=content, headers=JSON_CONTENT)

    def _send(self, method: str, path: str, **request: Any) -> dict[str, Any]:
        """One call, retried while the API cannot be reached or is restarting (a redeploy must not fail a long
        job), until it has failed for longer than the lease: then LeaseLost. Every call is safe to repeat:
        events are numbered, uploads replace, and a repeated outcome is refused as recorded."""

        headers = {**self._headers, **request.pop("headers", {})}

        def once() -> dict[str, Any]:
            response = _answered(self._http.request(method, path, headers=headers, **request))
            response.raise_for_status()
            return response.json()

        return _retrying(once, self._lease_seconds, LeaseLost)


class ExportClient:
    """A worker's calls for one merged-model export (/internal/v1/exports/{id}): the claim, with the worker
    token, then the attempt's calls, with the token the claim returned; retried as a job attempt's are."""

    def __init__(
        self,
        api_url: str,
        worker_token: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = internal_http(api_url, timeout, transport)
        self._worker_token = worker_token
        self._prefix = ""
        self._headers: dict[str, str] = {}
        self._lease_seconds = 0.0

    def close(self) -> None:
        self._http.close()

    def claim(self, export_id: str) -> ExportClaimReply:
        """Start an attempt, retried while the API restarts; ClaimRefused when the export is not queued (or
        was deleted with its model). The other calls act for this attempt."""
        response = _retrying(
            lambda: _answered(
                self._http.post(f"/exports/{export_id}/claim", headers=bearer(self._worker_token))
            ),
            CLAIM_RETRY_SECONDS,
            ApiUnreachable,
        )
        if response.status_code in (404, 409):
            raise ClaimRefused(response.json()["error"]["message"])
        response.raise_for_status()
        claim = ExportClaimReply.model_validate(response.json())
        self._prefix, self._headers = f"/exports/{claim.export_id}", bearer(claim.token)
        self._lease_seconds = claim.lease_seconds
        return claim

    def download_adapter(self, destination: Path) -> str:
        """The job's adapter archive, streamed to `destination`; returns its format (the API's header)."""

        def once() -> str:
            with self._http.stream("GET", f"{self._prefix}/adapter", headers=self._headers) as response:
                _answered(response).raise_for_status()
                with destination.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                return response.headers[FORMAT_HEADER]

        return _retrying(once, self._lease_seconds, LeaseLost)

    def heartbeat(self) -> ExportLease:
        return ExportLease.model_validate(self._send("POST", "/heartbeat").json())

    def upload(self, archive: Path, sha256: str) -> ExportReceipt:
        """Store the merged model's tar, streamed from the file (every try reads it again); the API keeps it
        only if what arrived has this sha256."""

        def chunks() -> Iterator[bytes]:
            with archive.open("rb") as source:
                while chunk := source.read(UPLOAD_CHUNK_BYTES):
                    yield chunk

        size = {"Content-Length": str(archive.stat().st_size)}
        reply = self._send("PUT", "/content", params={"sha256": sha256}, content=chunks, headers=size)
        return ExportReceipt.model_validate(reply.json())

    def fail(self, message: str) -> None:
        body = ExportFailure(message=message[:4000]).model_dump_json()
        self._send("POST", "/fail", content=body, headers=JSON_CONTENT)

    def _send(self, method: str, path: str, **request: Any) -> httpx.Response:
        """One call, retried until it has failed for longer than the lease (then LeaseLost). `content` may
        be a function making the body's chunks afresh for each try."""
        headers = {**self._headers, **request.pop("headers", {})}

        def once() -> httpx.Response:
            body = request.get("content")
            sent = {**request, "content": body()} if callable(body) else request
            response = _answered(self._http.request(method, self._prefix + path, headers=headers, **sent))
            return response.raise_for_status()

        return _retrying(once, self._lease_seconds, LeaseLost)


class _NotAnswered(Exception):
    """A try the API did not handle: it is restarting, or a concurrent copy of the call won a race."""


def _retrying(once: Callable[[], T], budget_seconds: float, give_up: type[ApiUnreachable]) -> T:
    """`once()` until it returns, backing off between tries, for at most `budget_seconds`; then `give_up`.
    Only an unreachable API and `_NotAnswered` are retried; any other exception is raised at once."""
    started = time.monotonic()

    def waited() -> float:
        return time.monotonic() - started

    def gave_up(state: tenacity.RetryCallState) -> NoReturn:
        raise give_up(f"{_problem(state)}; no answer for {waited():.0f} s") from _failure(state)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((httpx.TransportError, _NotAnswered)),
        stop=lambda _: waited() > budget_seconds,
        # The next delay of RETRY_DELAYS, but no sleeping far past the budget.
        wait=lambda state: min(_BACKOFF(state), budget_seconds - waited() + 0.1),
        sleep=lambda seconds: time.sleep(seconds),  # this module's clock, which the tests replace
        before_sleep=lambda state: log.warning(
            "%s; retrying in %.1fs", _problem(state), state.next_action.sleep if state.next_action else 0
        ),
        retry_error_callback=gave_up,
    )
    return retrying(once)


_BACKOFF = tenacity.wait_chain(*(tenacity.wait_fixed(delay) for delay in RETRY_DELAYS))


def _failure(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def _problem(state: tenacity.RetryCallState) -> str:
    """What went wrong with the last try, for the log and the give-up message."""
    failure = _failure(state)
    return str(failure) if isinstance(failure, _NotAnswered) else f"API unreachable ({failure!r})"


def _answered(response: httpx.Response) -> httpx.Response:
    if _retried(response):
        raise _NotAnswered(f"API answered {response.status_code}")
    return response


def _retried(response: httpx.Response) -> bool:
    """A restarting API (502/503/504), or a 409 `conflict`: a concurrent copy of this very call won a race,
    and the repeat finds its result."""
    if response.status_code == 409:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return response.json()["error"]["code"] == "conflict"
    return response.status_code in RETRIED_STATUSES
