"""What past jobs measured of the service's training speed, for the dry run's time estimate."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobStatus


def recent_succeeded(session: Session, model: str, limit: int) -> list[Job]:
    """The latest succeeded supervised jobs on base model `model` that trained and were timed, newest first
    (a DPO job's tokens/s, two answers a pair through a reference too, says nothing of a supervised one's)."""
    query = (
        select(Job)
        .where(
            Job.model == model,
            Job.method.is_(None),
            Job.status == JobStatus.SUCCEEDED,
            Job.trained_tokens.is_not(None),
            Job.started_at.is_not(None),
            Job.finished_at.is_not(None),
        )
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))
