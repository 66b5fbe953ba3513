"""Merged-model exports of jobs (app.exports)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.models.tables import Export


def of_job(session: Session, job_id: str) -> list[Export]:
    """A job's exports, newest first."""
    return list(session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.seq.desc())))


def get(session: Session, job_id: str, export_id: str) -> Export | None:
    return session.scalar(select(Export).where(Export.id == export_id, Export.job_id == job_id))


def lock(session: Session, export_id: str) -> Export | None:
    """The export with its row locked until the unit of work ends, as the database holds it now."""
    query = (
        select(Export)
        .where(Export.id == export_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalar(query)


def add(session: Session, export: Export) -> None:
    session.add(export)
    session.flush()


def delete_of_job(session: Session, job_id: str) -> list[str]:
    """Delete a job's exports; returns the storage keys of their archives."""
    keys = session.scalars(
        select(Export.storage_key).where(Export.job_id == job_id, Export.storage_key.is_not(None))
    )
    stored = [key for key in keys if key]
    session.execute(delete(Export).where(Export.job_id == job_id))
    return stored
