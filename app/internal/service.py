"""Worker ↔ API: claim a job, renew its lease, record events, store the adapter, report the outcome.

A worker proves itself twice: with the shared worker token to claim a job, then with a token scoped to
that attempt of that job for everything else. A superseded attempt's token gets 409, so a zombie worker
can never overwrite a newer attempt.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import hash_token
from app.config import Settings
from app.errors import Conflict, NotFound, Unauthorized
from app.jobs import artifacts
from app.jobs.service import add_event, finish_job
from app.models import Artifact, Checkpoint, Job, JobStatus
from app.models.base import now


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Missing worker credentials")
    return token.strip()


def _job(session: Session, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None:
        raise NotFound(f"No job '{job_id}'", code="job_not_found")
    return job


def check_worker_token(settings: Settings, authorization: str | None) -> None:
    if not hmac.compare_digest(_bearer(authorization), settings.resolved_worker_token):
        raise Unauthorized("Invalid worker token")


def servable_artifact(
    session: Session, settings: Settings, adapter_id: str, authorization: str | None
) -> Artifact:
    """The archive the inference server loads for a job or checkpoint id (worker token). A deleted model,
    or a job that has not succeeded, has none."""
    check_worker_token(settings, authorization)
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.id == adapter_id))
    job_id = checkpoint.job_id if checkpoint else adapter_id
    scope = artifacts.checkpoint_scope(checkpoint.step_number) if checkpoint else Artifact.FINAL
    job = session.scalar(select(Job).where(Job.id == job_id))
    artifact = artifacts.for_serving(session, job_id, scope) if job and not job.model_deleted_at else None
    if artifact is None or (checkpoint is None and job.status != JobStatus.SUCCEEDED):
        raise NotFound(f"No servable adapter for '{adapter_id}'", code="model_not_found")
    return artifact


def claim_job(session: Session, settings: Settings, job_id: str, authorization: str | None) -> dict[str, Any]:
    """Start a new attempt of a queued job and hand its spec and attempt token to the worker."""
    check_worker_token(settings, authorization)
    job = _job(session, job_id)
    if job.status != JobStatus.QUEUED:
        raise Conflict(f"Job {job_id} is {job.status}, not queued", code="job_not_claimable")
    job.attempt += 1
    token = f"{job.attempt}.{secrets.token_urlsafe(32)}"
    job.attempt_token_hash = hash_token(token)
    job.status = JobStatus.RUNNING
    job.started_at = job.started_at or now()
    job.lease_expires_at = now() + settings.lease_seconds
    add_event(session, job.id, f"Training started (attempt {job.attempt})")
    return {
        "job_id": job.id,
        "attempt": job.attempt,
        "token": token,
        "model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "training_config": job.training_config,
        "peft_config": job.peft_config,
        "heartbeat_seconds": settings.heartbeat_seconds,
    }


def attempt_job(session: Session, job_id: str, authorization: str | None) -> Job:
    """The running job an attempt token belongs to; 409 for a superseded or finished attempt."""
    token = _bearer(authorization)
    job = _job(session, job_id)
    attempt, _, _ = token.partition(".")
    if not attempt.isdigit():
        raise Unauthorized("Malformed attempt token")
    if int(attempt) < job.attempt:
        raise Conflict(
            f"Attempt {attempt} of job {job_id} was superseded by attempt {job.attempt}",
            code="attempt_superseded",
        )
    if not job.attempt_token_hash or not hmac.compare_digest(hash_token(token), job.attempt_token_hash):
        raise Unauthorized("Invalid attempt token")
    if job.status != JobStatus.RUNNING:
        raise Conflict(f"Job {job_id} is {job.status}; this attempt is over", code="attempt_over")
    return job


def renew_lease(job: Job, settings: Settings) -> dict[str, bool]:
    job.lease_expires_at = now() + settings.lease_seconds
    return {"cancel_requested": job.cancel_requested}


def record_events(session: Session, job: Job, events: list[dict[str, Any]]) -> None:
    """Store worker events; a metrics event also moves the job's progress."""
    for event in events:
        add_event(
            session,
            job.id,
            event["message"],
            level=event["level"],
            type=event["type"],
            data=event.get("data"),
        )
        data = event.get("data") or {}
        if event["type"] == "metrics" and "step" in data:
            job.progress = {
                "step": data["step"],
                "total_steps": data.get("total_steps"),
                "epoch": data.get("epoch"),
            }


def complete_job(session: Session, job: Job, outcome: dict[str, Any]) -> None:
    """Record the attempt's outcome: succeeded (adapter stored), cancelled, or failed with a message."""
    status = JobStatus(outcome["status"])
    if status == JobStatus.SUCCEEDED:
        if not artifacts.formats_of(session, job.id):
            raise Conflict("Upload the adapter before reporting success", code="adapter_missing")
        shipped = outcome.get("shipped_step")
        finish_job(
            session,
            job,
            status,
            "The job has successfully completed"
            + (f"; it ships the adapter of step {shipped}, the lowest validation loss" if shipped else ""),
            fine_tuned_model=artifacts.fine_tuned_model_name(job),
            trained_tokens=outcome.get("trained_tokens"),
            shipped_step=shipped,
            peft_unavailable_reason=outcome.get("peft_unavailable_reason"),
        )
    elif status == JobStatus.CANCELLED:
        finish_job(session, job, status, "Job cancelled", trained_tokens=outcome.get("trained_tokens"))
    else:
        error = outcome.get("error") or {}
        message = error.get("message") or "Training failed"
        finish_job(
            session,
            job,
            JobStatus.FAILED,
            f"Training failed: {message}",
            error={"code": error.get("code") or "training_failed", "message": message, "param": None},
        )
