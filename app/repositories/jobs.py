"""Jobs, their events and their outbox messages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, inspect, select, update
from sqlalchemy.orm import Session

from app.db import OneRow
from app.models import Job, JobEvent, JobStatus, Outbox
from app.models.base import new_id, now


def get(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id))


# Every column under its attribute name, so that a row reads like a Job (`row.job_metadata`).
_JOB_COLUMNS = [attr.columns[0].label(attr.key) for attr in inspect(Job).column_attrs]
# Built once: every GET of a job runs one, and building a statement cost more than executing it. The job as
# a plain row, without an ORM session, for reads that change nothing: (tenant_id, job_id), by app.db.read.
record_for_tenant = OneRow.where(_JOB_COLUMNS, tenant_id=Job.tenant_id, job_id=Job.id)
_JOB_FOR_TENANT = select(Job).where(record_for_tenant.condition)


def get_for_tenant(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(_JOB_FOR_TENANT, {"job_id": job_id, "tenant_id": tenant_id})


def lock(session: Session, job_id: str) -> Job | None:
    """The job with its row locked until the unit of work ends (PostgreSQL; SQLite locks on write), as the
    database holds it now: a copy the session loaded earlier (before a long upload) is refreshed."""
    query = select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    return session.scalar(query)


def status_of(session: Session, job_id: str) -> JobStatus | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return None if status is None else JobStatus(status)


def add(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()


def list_query(tenant_id: str, metadata: Mapping[str, str]) -> Select:
    """The tenant's jobs whose metadata holds every given pair."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    for key, value in metadata.items():
        query = query.where(Job.job_metadata[key].as_string() == value)
    return query


@dataclass(frozen=True)
class Guard:
    """What a guarded update requires of the row: one of `statuses`, the flag columns `flags` as given, an
    expired lease if `lease_expired`, and that attempt if `attempt` is given."""

    statuses: Iterable[JobStatus]
    flags: Mapping[str, bool]
    lease_expired: bool = False
    attempt: int | None = None

    def conditions(self) -> list[Any]:
        where: list[Any] = [Job.status.in_(sorted(self.statuses))]
        where += [getattr(Job, flag).is_(value) for flag, value in self.flags.items()]
        if self.lease_expired:
            where.append(Job.lease_expires_at < now())
        if self.attempt is not None:
            where.append(Job.attempt == self.attempt)
        return where


def guarded_update(
    session: Session, job: Job, guard: Guard, values: Mapping[str, Any], *, increments: Iterable[str] = ()
) -> bool:
    """`UPDATE jobs SET values, counter = counter + 1 … WHERE id = job.id AND <guard>`, then refresh `job`;
    True if the row matched. The UPDATE holds the row's lock until commit, which is what makes a state
    transition atomic."""
    counted = {column: getattr(Job, column) + 1 for column in increments}
    statement = (
        update(Job)
        .where(Job.id == job.id, *guard.conditions())
        .values({**values, **counted})
        .execution_options(synchronize_session=False)  # `job` is refreshed right after
    )
    done = session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
    session.refresh(job)
    return done


def expired_lease_ids(session: Session) -> list[tuple[str, int]]:
    """(id, attempt) of running jobs whose lease has expired."""
    query = select(Job.id, Job.attempt).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now())
    return [(job_id, attempt) for job_id, attempt in session.execute(query)]


def counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: count for status, count in rows}


def fine_tuned_query(tenant_id: str) -> Select:
    """The tenant's callable fine-tuned models, as their jobs."""
    return select(Job).where(
        Job.tenant_id == tenant_id,
        Job.status == JobStatus.SUCCEEDED,
        Job.fine_tuned_model.is_not(None),
        Job.model_deleted_at.is_(None),
    )


def fine_tuned(session: Session, tenant_id: str, model_id: str) -> Job | None:
    return session.scalar(fine_tuned_query(tenant_id).where(Job.fine_tuned_model == model_id))


def fine_tuned_models(session: Session, tenant_id: str) -> list[Job]:
    return list(session.scalars(fine_tuned_query(tenant_id).order_by(Job.seq)))


# Events


def add_event(
    session: Session, job_id: str, message: str, *, level: str, type: str, data: Any = None
) -> JobEvent:
    event = JobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(event)
    return event


def events_query(job_id: str) -> Select:
    return select(JobEvent).where(JobEvent.job_id == job_id)


def metrics_data(session: Session, job_id: str) -> Iterator[dict[str, Any]]:
    """The data of the job's metrics events, in the order they were stored."""
    query = (
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
        .execution_options(yield_per=1000)  # a long job logs many steps
    )
    return (data for data in session.scalars(query) if data)


def events_after(session: Session, job_id: str, after_seq: int, limit: int) -> list[JobEvent]:
    query = events_query(job_id).where(JobEvent.seq > after_seq).order_by(JobEvent.seq).limit(limit)
    return list(session.scalars(query))


def event_seq(session: Session, job_id: str, event_id: str) -> int | None:
    return session.scalar(select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.id == event_id))


def last_event_seq(session: Session, job_id: str) -> int:
    return session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0


def stored_worker_seqs(session: Session, job_id: str, attempt: int, seqs: list[int]) -> set[int]:
    """Which of an attempt's worker-numbered events are stored already."""
    if not seqs:
        return set()
    query = select(JobEvent.worker_seq).where(
        JobEvent.job_id == job_id, JobEvent.attempt == attempt, JobEvent.worker_seq.in_(seqs)
    )
    return {seq for seq in session.scalars(query) if seq is not None}


# Outbox


def add_message(session: Session, job_id: str) -> None:
    """A training message for the job, sent once committed (app.jobs.outbox)."""
    session.add(Outbox(job_id=job_id))


def unsent_message_ids(session: Session, *, job_id: str | None = None, min_age: float = 0) -> list[int]:
    """Unsent outbox rows (of one job, or all older than `min_age` seconds), oldest first."""
    query = select(Outbox.seq).where(Outbox.sent_at.is_(None), Outbox.created_at <= now() - min_age)
    if job_id is not None:
        query = query.where(Outbox.job_id == job_id)
    return list(session.scalars(query.order_by(Outbox.seq)))


def claim_unsent_message(session: Session, seq: int) -> str | None:
    """Mark an outbox row sent and return its job id; None if another API process sent it meanwhile."""
    row = session.scalar(select(Outbox).where(Outbox.seq == seq, Outbox.sent_at.is_(None)).with_for_update())
    if row is None:
        return None
    row.sent_at = now()
    return row.job_id


def unsent_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None))) or 0


def queued_jobs_last_sent_before(session: Session, min_age: float) -> list[str]:
    """Queued jobs all of whose messages were sent, the last more than `min_age` seconds ago."""
    last_sent = (
        select(Outbox.job_id, func.max(Outbox.sent_at).label("sent_at"))
        .group_by(Outbox.job_id)
        .having(func.count() == func.count(Outbox.sent_at))  # no message of the job is still unsent
        .subquery()
    )
    return list(
        session.scalars(
            select(Job.id)
            .join(last_sent, last_sent.c.job_id == Job.id)
            .where(Job.status == JobStatus.QUEUED, last_sent.c.sent_at <= now() - min_age)
        )
    )


UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def unfinished_count(session: Session, tenant_id: str) -> int:
    """The tenant's jobs that are not final: queued, running or paused."""
    query = select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(UNFINISHED))
    return session.scalar(query) or 0
