"""Exports of a job's merged model: requested by its tenant, made by a worker, stored as one tar.

An export is queued with a broker message naming it; a worker claims it (one attempt at a time, proven by
an attempt token derived as a job attempt's is: `app.internal.service.attempt_token`), renews its lease
while it merges, then uploads the tar or reports why it failed. Leases are checked when an export is read
(every poll of a waiting client): an attempt whose lease expired is retried, up to MAX_ATTEMPTS, and a
queued export whose message the broker lost is sent again.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import on_rollback
from app.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from app.internal.contracts import ExportClaimReply
from app.internal.service import ATTEMPT_TOKEN, INVALID_ATTEMPT_TOKEN, attempt_token
from app.jobs.leases import MAX_ATTEMPTS
from app.models import Job, JobStatus
from app.models.base import new_id, now
from app.models.tables import Export
from app.repositories import exports, files, jobs, tenants
from app.service_auth import presented, same_secret
from app.storage import Storage


def request_export(
    session: Session, job: Job, fmt: str, *, retry_failed: bool, max_stored_bytes: int
) -> tuple[Export, bool]:
    """The job's newest export in `fmt`, else a new one; and whether it is new (its message is to be sent
    once committed). A failed newest export is replaced by a new one when `retry_failed` (a POST), else
    returned (a poller of `…/merged` sees the failure instead of starting a merge on every poll). Only a
    succeeded job whose model exists has one, and a new one only while its tenant stores less than
    `max_stored_bytes` (0: no limit): a merged model's size is known once it is made."""
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"Job {job.id} is {job.status}; its merged model can be exported once it has succeeded",
            code="job_not_succeeded",
        )
    if job.model_deleted_at:
        raise Conflict(
            f"The model of job {job.id} ({job.fine_tuned_model}) was deleted; it cannot be exported",
            code="model_deleted",
        )
    if (found := _reusable(session, job, fmt, retry_failed)) is not None:
        return found, False  # a poll: no lock taken
    # One export per format, and the storage limit counted then passed once: concurrent requests queue on the
    # tenant (on SQLite too, where the job row's SELECT ... FOR UPDATE would hold nothing), then look again.
    tenants.lock(session, job.tenant_id)
    jobs.lock(session, job.id)
    if (found := _reusable(session, job, fmt, retry_failed)) is not None:
        return found, False
    if max_stored_bytes and (stored := files.stored_bytes(session, job.tenant_id)) >= max_stored_bytes:
        raise PayloadTooLarge(
            f"The API key's tenant stores {stored} bytes, at its limit of {max_stored_bytes}; delete "
            "files or models before exporting a merged model",
            code="storage_limit_exceeded",
        )
    export = Export(id=new_id("ftexp"), job_id=job.id, format=fmt, status=Export.QUEUED, sent_at=now())
    exports.add(session, export)
    return export, True


def _reusable(session: Session, job: Job, fmt: str, retry_failed: bool) -> Export | None:
    newest = next((export for export in exports.of_job(session, job.id) if export.format == fmt), None)
    if newest is None or (retry_failed and newest.status == Export.FAILED):
        return None
    return newest


def exports_of(session: Session, job_id: str) -> list[Export]:
    return exports.of_job(session, job_id)


def get(session: Session, job: Job, export_id: str) -> Export:
    export = exports.get(session, job.id, export_id)
    if export is None:
        raise NotFound(
            f"Job {job.id} has no export '{export_id}'", param="export_id", code="export_not_found"
        )
    return export


def content(export: Export) -> str:
    """The storage key of a succeeded export's tar; 409 while it is being made or when it failed."""
    if export.status != Export.SUCCEEDED or export.storage_key is None:
        raise Conflict(
            f"Export {export.id} is {export.status}; its content exists once it has succeeded",
            code="export_not_ready",
        )
    return export.storage_key


def refresh(session: Session, settings: Settings, export: Export, broker_empty: Callable[[], bool]) -> bool:
    """Recover an export whose worker was lost (its lease expired) or whose message the broker lost (queued
    for longer than redeliver_seconds while the training queue is empty). Returns whether a message must be
    sent once committed."""
    moment = now()
    lost = export.status == Export.RUNNING and (export.lease_expires_at or 0) < moment
    stale = export.status == Export.QUEUED and (export.sent_at or 0) + settings.redeliver_seconds < moment
    if not (lost or stale):
        return False
    locked = exports.lock(session, export.id)  # as committed now: another reader may have recovered it
    if locked is None:
        return False
    if locked.status == Export.RUNNING and (locked.lease_expires_at or 0) < moment:
        if locked.attempt >= MAX_ATTEMPTS:
            lost_attempts = f"{locked.attempt} attempts were lost"
            _fail(locked, "worker_lost", f"The worker stopped responding; {lost_attempts}")
            return False
        locked.status, locked.lease_expires_at, locked.sent_at = Export.QUEUED, None, moment
        return True
    if locked.status == Export.QUEUED and (locked.sent_at or 0) + settings.redeliver_seconds < moment:
        if not broker_empty():
            return False  # its message still waits, behind others
        locked.sent_at = moment
        return True
    return False


# The worker's side


def claim(session: Session, settings: Settings, export_id: str) -> ExportClaimReply:
    """Start a new attempt at a queued export; 409 for one that is not queued (a duplicate message)."""
    export = exports.lock(session, export_id)
    if export is None:
        raise NotFound(f"No export '{export_id}'", code="export_not_found")
    if export.status != Export.QUEUED:
        raise Conflict(f"Export {export_id} is {export.status}, not queued", code="export_not_claimable")
    job = jobs.get(session, export.job_id)
    assert job is not None  # an export is deleted with its job
    export.status, export.attempt = Export.RUNNING, export.attempt + 1
    export.lease_expires_at = now() + settings.lease_seconds
    return ExportClaimReply(
        export_id=export.id,
        job_id=job.id,
        attempt=export.attempt,
        token=attempt_token(settings, export.id, export.attempt),
        model=job.model,
        heartbeat_seconds=settings.heartbeat_seconds,
        lease_seconds=settings.lease_seconds,
    )


def current_attempt(
    session: Session, settings: Settings, export_id: str, authorization: str | None
) -> Export:
    """The running export whose attempt token the header holds, its row locked: 401 for a token the API
    never issued for it (the same answer when it does not exist), 409 for a superseded or finished
    attempt's. The token is checked against its MAC before the row is read."""
    token = presented(authorization, "attempt token")
    parsed = ATTEMPT_TOKEN.fullmatch(token)
    attempt = int(parsed.group(1)) if parsed else 0
    if parsed is None or not same_secret(token, attempt_token(settings, export_id, attempt)):
        raise Unauthorized(INVALID_ATTEMPT_TOKEN, code="invalid_attempt_token")
    export = exports.lock(session, export_id)
    if export is None or attempt > export.attempt:
        raise Unauthorized(INVALID_ATTEMPT_TOKEN, code="invalid_attempt_token")
    if attempt < export.attempt or export.status != Export.RUNNING:
        raise Conflict(f"Attempt {attempt} of export {export_id} is over", code="attempt_over")
    return export


def renew_lease(export: Export, settings: Settings) -> int:
    export.lease_expires_at = now() + settings.lease_seconds
    return export.lease_expires_at


def store(
    session: Session,
    storage: Storage,
    export: Export,
    temp: Path,
    claimed_sha256: str,
    sha256: str,
    size: int,
) -> None:
    """Record an uploaded tar as the export's content, if it arrived whole (its sha256 as the worker
    computed it); the export has succeeded."""
    if claimed_sha256 != sha256:
        raise InvalidRequest(
            f"The merged model arrived with sha256 {sha256}, not {claimed_sha256}: it is incomplete or "
            "damaged and was not stored",
            param="sha256",
            code="export_checksum_mismatch",
        )
    key = f"exports/{export.job_id}/{export.id}-attempt-{export.attempt}-{secrets.token_hex(6)}.tar"
    storage.commit(temp, key)
    on_rollback(session, lambda: storage.delete(key))
    export.storage_key, export.sha256, export.bytes = key, sha256, size
    export.status, export.lease_expires_at, export.finished_at = Export.SUCCEEDED, None, now()


def fail(export: Export, message: str) -> None:
    _fail(export, "export_failed", message)


def _fail(export: Export, code: str, message: str) -> None:
    export.status, export.lease_expires_at, export.finished_at = Export.FAILED, None, now()
    export.error = {"code": code, "message": message, "param": None}
