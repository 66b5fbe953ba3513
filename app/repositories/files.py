"""Uploaded datasets."""

from __future__ import annotations

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Artifact, File, Job, JobStatus
from app.models.tables import Export


def get(session: Session, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def list_query(tenant_id: str, purpose: str | None) -> Select:
    query = select(File).where(File.tenant_id == tenant_id)
    return query if purpose is None else query.where(File.purpose == purpose)


def add(session: Session, row: File) -> None:
    session.add(row)
    session.flush()


def delete(session: Session, row: File) -> None:
    session.delete(row)


def forget_result_file(session: Session, row: File) -> None:
    """The job whose result file `row` is lists it no more."""
    query = update(Job).where(Job.tenant_id == row.tenant_id, Job.result_file == row.id)
    session.execute(query.values(result_file=None))


def unfinished_job_using(session: Session, row: File) -> str | None:
    """The id of a queued, running or paused job that will still download the file, if any."""
    return session.scalar(
        select(Job.id).where(
            Job.tenant_id == row.tenant_id,
            or_(Job.training_file == row.id, Job.validation_file == row.id),
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED]),
        )
    )


def stored_bytes(session: Session, tenant_id: str) -> int:
    """What the tenant stores: its files, its jobs' adapter archives (final and checkpoints') and their
    merged-model exports."""
    uploads = select(func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id)
    archives = (
        select(func.coalesce(func.sum(Artifact.bytes), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
    )
    merged = (
        select(func.coalesce(func.sum(Export.bytes), 0))
        .join(Job, Job.id == Export.job_id)
        .where(Job.tenant_id == tenant_id)
    )
    return sum(int(session.scalar(query) or 0) for query in (uploads, archives, merged))
