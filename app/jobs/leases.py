"""Lease reaping: a running job whose worker stopped heartbeating (its lease expired) loses that attempt.

It is queued again as a new attempt, which resumes from the newest resume state, until MAX_ATTEMPTS
attempts were lost; then the job fails with the reason. A cancellation or a pause asked for meanwhile is
carried out instead. The API's housekeeping loop (app.jobs.housekeeping)
calls `reap_expired_leases` every round.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db import session_scope
from app.jobs import states
from app.jobs.service import finish_job, hold_paused, requeue, resume_point
from app.jobs.states import Transition
from app.models import JobStatus
from app.repositories import jobs

MAX_ATTEMPTS = 3


def reap_expired_leases(database_url: str) -> int:
    """Re-queue (or fail, cancel, pause) running jobs whose worker stopped heartbeating, each in a unit of
    work of its own. Returns how many expired leases were found."""
    with session_scope(database_url) as session:
        expired = jobs.expired_lease_ids(session)
    for job_id, attempt in expired:
        with session_scope(database_url) as session:
            reap(session, job_id, attempt)
    return len(expired)


def reap(session: Session, job_id: str, attempt: int) -> None:
    """End attempt `attempt` of a job whose lease expired, unless a heartbeat or an outcome that committed
    since it was found keeps the job its attempt."""
    job = jobs.get(session, job_id)
    if job is None:
        return
    try:
        lost = states.transition(session, job, Transition.LOSE_LEASE, of_attempt=attempt)
    except states.IllegalTransition:  # it ended or was handed back since it was found
        return
    if not lost:
        return
    # The row is ours until the commit: the transition below cannot be refused.
    if job.cancel_requested:
        finish_job(session, job, JobStatus.CANCELLED, "Job cancelled; its worker stopped responding")
    elif job.lost_attempts >= MAX_ATTEMPTS:
        finish_job(
            session,
            job,
            JobStatus.FAILED,
            f"Worker stopped responding on attempt {job.attempt}; {job.lost_attempts} attempts were lost",
            error={"code": "worker_lost", "message": "The worker stopped responding", "param": None},
        )
    elif job.pause_requested:
        hold_paused(
            session,
            job,
            f"Job paused; its worker stopped responding. Resuming continues from {resume_point(job)}",
        )
    else:
        requeue(
            session,
            job,
            f"Worker stopped responding; retrying as attempt {job.attempt + 1}, from {resume_point(job)}",
            level="warn",
        )
