"""Worker ↔ API: claim a job, renew its lease, record events, store the adapter, report the outcome.

A worker proves itself twice: with the shared worker token to claim a job (which is all that token can do),
then with a token scoped to that attempt of that job for everything else. Attempt tokens are derived from
the job id and the attempt number with a key only the API holds (`attempt_token`), so the API recognises
every token it issued: a superseded attempt's token gets 409 (a zombie worker learns to stop, and can never
overwrite a newer attempt), while a forged or malformed token gets the same 401 whether the job exists or
not, before anything about the job is revealed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.auth import hash_token
from app.config import Settings
from app.errors import Conflict, NotFound, Unauthorized
from app.internal.contracts import HANDED_BACK, ClaimReply, LeaseReply, Outcome, WorkerEvent
from app.jobs import artifacts, results, resume_states, states
from app.jobs.service import add_event, finish_job, hold_paused, requeue, resume_point
from app.jobs.states import Transition
from app.models import Artifact, Job, JobStatus
from app.models.base import now
from app.repositories import artifacts as stored
from app.repositories import jobs
from app.service_auth import check_secret, presented, same_secret
from app.specs import TrainingConfig
from app.storage import Storage

# "<attempt>.<secret>": the attempt number in ASCII digits (int() would also take '²' or '٣'), bounded.
ATTEMPT_TOKEN = re.compile(r"([1-9][0-9]{0,8})\.([A-Za-z0-9_-]{1,128})")
INVALID_ATTEMPT_TOKEN = "Invalid attempt token"


@dataclass(frozen=True)
class Attempt:
    """A running attempt of a job, proven by its token; the job's row is locked until the unit of work
    ends."""

    job: Job
    token: str


def _job(session: Session, job_id: str) -> Job:
    job = jobs.lock(session, job_id)
    if job is None:
        raise NotFound(f"No job '{job_id}'", code="job_not_found")
    return job


def check_worker_token(settings: Settings, authorization: str | None) -> None:
    check_secret(authorization, settings.resolved_worker_token, "worker token")


def check_serving_token(settings: Settings, authorization: str | None) -> None:
    check_secret(authorization, settings.resolved_serving_token, "serving token")


def attempt_token(settings: Settings, job_id: str, attempt: int) -> str:
    """The token of attempt `attempt` of `job_id`: a MAC of both under the API's attempt key."""
    mac = hmac.digest(settings.resolved_attempt_key.encode(), f"{job_id}.{attempt}".encode(), hashlib.sha256)
    return f"{attempt}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def servable_artifact(session: Session, adapter_id: str) -> Artifact:
    """The archive the inference server loads for a job or checkpoint id. A deleted model, or a job that
    has not succeeded, has none."""
    checkpoint = stored.checkpoint(session, adapter_id)
    job_id = checkpoint.job_id if checkpoint else adapter_id
    scope = artifacts.checkpoint_scope(checkpoint.step_number) if checkpoint else Artifact.FINAL
    job = jobs.get(session, job_id)
    if job is None or job.model_deleted_at or (checkpoint is None and job.status != JobStatus.SUCCEEDED):
        raise NotFound(f"No servable adapter for '{adapter_id}'", code="model_not_found")
    artifact = artifacts.for_serving(session, job_id, scope)
    if artifact is None:
        raise NotFound(f"No servable adapter for '{adapter_id}'", code="model_not_found")
    return artifact


def claim_job(session: Session, settings: Settings, job_id: str) -> ClaimReply:
    """Start a new attempt of a queued job and hand its spec, attempt token and resume states to the worker.
    A job that is not queued (a duplicate or redelivered message, a cancelled or paused job) is a 409."""
    job = _job(session, job_id)
    # Guarded, so that of two workers holding copies of the job's message exactly one starts an attempt.
    try:
        states.transition(session, job, Transition.CLAIM)
    except states.IllegalTransition:
        raise Conflict(f"Job {job_id} is {job.status}, not queued", code="job_not_claimable") from None
    job.attempt += 1
    token = attempt_token(settings, job.id, job.attempt)
    job.attempt_token_hash = hash_token(token)
    job.started_at = job.started_at or now()
    job.lease_expires_at = now() + settings.lease_seconds
    add_event(session, job.id, f"Training started (attempt {job.attempt})")
    return ClaimReply(
        job_id=job.id,
        attempt=job.attempt,
        token=token,
        model=job.model,
        suffix=job.suffix,
        training_file=job.training_file,
        validation_file=job.validation_file,
        training_config=_for_workers(job.training_config),
        peft_config=job.peft_config,
        heartbeat_seconds=settings.heartbeat_seconds,
        lease_seconds=settings.lease_seconds,
        resume_states=resume_states.listed(session, job.id),
        method=job.method,
    )


# training_config keys that workers of earlier versions lack; each is left out of a claim while it holds its
# default (TrainingConfig's), which asks nothing of them.
NEWER_KEYS = ("report_to", "init_from", "early_stopping_patience", "early_stopping_threshold")


def _for_workers(training_config: dict[str, Any]) -> dict[str, Any]:
    """The job's training_config as every worker version takes it: each refuses a key it does not know, so a
    NEWER_KEYS key at its default is left out. A rolling deploy then keeps those workers training every job
    that uses none of them; one that does fails there before it trains (TrainingConfig refuses the key),
    rather than train without it."""
    defaults = {
        key: TrainingConfig.model_fields[key].get_default(call_default_factory=True) for key in NEWER_KEYS
    }
    return {
        key: value for key, value in training_config.items() if key not in defaults or value != defaults[key]
    }


def current_attempt(session: Session, settings: Settings, job_id: str, authorization: str | None) -> Attempt:
    """The running attempt whose token the Authorization header holds; 401 for any other token, 409 for a
    superseded or finished attempt's."""
    token = presented(authorization, "attempt token")
    return Attempt(attempt_job(session, settings, job_id, token), token)


def attempt_job(session: Session, settings: Settings, job_id: str, token: str) -> Job:
    """The running job an attempt token belongs to, its row locked. 401 for a token the API never issued for
    this job (the same answer for a job that does not exist); 409 for one of a superseded or finished
    attempt.

    The token is checked first, against its MAC, without the job's row: only a token the API issued for this
    job leads to the row's lookup (and lock), so a forged one can neither probe for jobs nor queue behind
    their locks."""
    parsed = ATTEMPT_TOKEN.fullmatch(token)
    attempt = int(parsed.group(1)) if parsed else 0
    if parsed is None or not same_secret(token, attempt_token(settings, job_id, attempt)):
        raise Unauthorized(INVALID_ATTEMPT_TOKEN, code="invalid_attempt_token")
    job = jobs.lock(session, job_id)
    if job is None or attempt > job.attempt:  # a job since deleted; an attempt never issued
        raise Unauthorized(INVALID_ATTEMPT_TOKEN, code="invalid_attempt_token")
    if attempt < job.attempt:
        raise Conflict(
            f"Attempt {attempt} of job {job_id} was superseded by attempt {job.attempt}",
            code="attempt_superseded",
        )
    # The running attempt's token, as issued (the hash is the claim's record of it).
    if not (job.attempt_token_hash and same_secret(hash_token(token), job.attempt_token_hash)):
        raise Unauthorized(INVALID_ATTEMPT_TOKEN, code="invalid_attempt_token")
    if job.status != JobStatus.RUNNING:
        raise Conflict(f"Job {job_id} is {job.status}; this attempt is over", code="attempt_over")
    return job


def renew_lease(job: Job, settings: Settings) -> LeaseReply:
    job.lease_expires_at = now() + settings.lease_seconds
    return LeaseReply(cancel_requested=job.cancel_requested, pause_requested=job.pause_requested)


def record_events(session: Session, job: Job, events: list[WorkerEvent]) -> None:
    """Store worker events, each numbered event once (a retried post repeats them); a metrics event also
    moves the job's progress."""
    numbered = [event.seq for event in events if event.seq is not None]
    seen = jobs.stored_worker_seqs(session, job.id, job.attempt, numbered)
    for event in events:
        if event.seq is not None and event.seq in seen:
            continue
        if event.seq is not None:
            seen.add(event.seq)
        added = add_event(session, job.id, event.message, level=event.level, type=event.type, data=event.data)
        added.attempt, added.worker_seq = (job.attempt, event.seq) if event.seq is not None else (None, None)
        data = event.data or {}
        if event.type == "metrics" and "step" in data:
            job.progress = {
                "step": data["step"],
                "total_steps": data.get("total_steps"),
                "epoch": data.get("epoch"),
            }


def complete_job(session: Session, storage: Storage, job: Job, outcome: Outcome) -> None:
    """Record the attempt's outcome: succeeded (adapter stored, result file made), cancelled, failed with a
    message, or handed back with its state saved: paused, or requeued for another worker (not counted as a
    lost attempt)."""
    try:
        _end_attempt(session, storage, job, outcome)
    except states.IllegalTransition:  # attempt_job found it running, and holds its row (PostgreSQL)
        raise Conflict(f"Job {job.id} is {job.status}; this attempt is over", code="attempt_over") from None


def _end_attempt(session: Session, storage: Storage, job: Job, outcome: Outcome) -> None:
    if outcome.status in HANDED_BACK:
        _hand_back(session, job, outcome)
        return
    status = JobStatus(outcome.status)
    if status == JobStatus.SUCCEEDED:
        if not artifacts.formats_of(session, job.id):
            raise Conflict("Upload the adapter before reporting success", code="adapter_missing")
        shipped = outcome.shipped_step
        # In the success's transaction, so made with it only once (a success reported again finds the
        # attempt over: 409); before its transition, whose webhook carries the job with its result_files.
        result_file = results.store_result_file(session, storage, job)
        finish_job(
            session,
            job,
            status,
            "The job has successfully completed"
            + (f"; it ships the adapter of step {shipped}, the lowest validation loss" if shipped else ""),
            fine_tuned_model=artifacts.fine_tuned_model_name(job),
            trained_tokens=outcome.trained_tokens,
            shipped_step=shipped,
            peft_unavailable_reason=outcome.peft_unavailable_reason,
            result_file=result_file,
        )
    elif status == JobStatus.CANCELLED:
        finish_job(session, job, status, "Job cancelled", trained_tokens=outcome.trained_tokens)
    else:
        message = (outcome.error.message if outcome.error else None) or "Training failed"
        code = (outcome.error.code if outcome.error else None) or "training_failed"
        finish_job(
            session,
            job,
            JobStatus.FAILED,
            f"Training failed: {message}",
            error={"code": code, "message": message, "param": None},
        )


def _hand_back(session: Session, job: Job, outcome: Outcome) -> None:
    """An attempt that stopped with its state saved. A cancellation asked for meanwhile wins; a pause asked
    for meanwhile turns a requeue into a pause."""
    if job.cancel_requested:
        finish_job(session, job, JobStatus.CANCELLED, "Job cancelled", trained_tokens=outcome.trained_tokens)
    elif job.pause_requested:  # still asked for: a pause withdrawn meanwhile makes a paused attempt a requeue
        hold_paused(session, job, f"Job paused; resuming it continues from {resume_point(job)}")
    else:
        reason = outcome.reason or (
            "the pause was withdrawn" if outcome.status == JobStatus.PAUSED else "it was stopped"
        )
        requeue(
            session,
            job,
            f"Attempt {job.attempt} handed the job back ({reason}); it continues from {resume_point(job)}",
        )
