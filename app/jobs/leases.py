"""Lease reaping: a running job whose worker stopped heartbeating (its lease expired) loses that attempt.

It is queued again as a new attempt, which resumes from the newest resume state, until MAX_ATTEMPTS
attempts were lost; then the job fails with the reason. A cancellation or a pause asked for meanwhile is
carried out instead. The outbox relay's background loop calls `reap_expired_leases` every round.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import states
from app.jobs.service import finish_job, hold_paused, requeue, resume_point
from app.jobs.states import Transition
from app.models import Job, JobStatus
from app.models.base import now

MAX_ATTEMPTS = 3


def reap_expired_leases(session: Session) -> int:
    """Re-queue (or fail, cancel, pause) running jobs whose worker stopped heartbeating; each committed on
    its own. Returns how many expired leases were found."""
    expired = list(
        session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now()))
    )
    for job in expired:
        # Guarded: a heartbeat or an outcome that committed since the read keeps the job its attempt.
        try:
            lost = states.transition(session, job, Transition.LOSE_LEASE, Job.attempt == job.attempt)
        except states.IllegalTransition:  # it ended or was handed back since the read
            lost = False
        if not lost:
            continue
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
        session.commit()
    return len(expired)
