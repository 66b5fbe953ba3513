"""What training leaves behind: adapter archives, checkpoints and resume states."""

from __future__ import annotations

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app.models import Artifact, Checkpoint, Job, JobStatus, ResumeState

# Adapter archives


def find_artifact(session: Session, job_id: str, scope: str, fmt: str) -> Artifact | None:
    return session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.scope == scope, Artifact.format == fmt)
    )


def add_artifact(session: Session, artifact: Artifact) -> None:
    session.add(artifact)


def formats(session: Session, job_id: str, scope: str) -> list[str]:
    query = select(Artifact.format).where(Artifact.job_id == job_id, Artifact.scope == scope)
    return sorted(session.scalars(query))


def delete_scope(session: Session, job_id: str, scope: str) -> list[str]:
    """Delete the rows of one scope's archives; returns their storage keys."""
    where = (Artifact.job_id == job_id, Artifact.scope == scope)
    keys = list(session.scalars(select(Artifact.storage_key).where(*where)))
    session.execute(delete(Artifact).where(*where))
    return keys


# Checkpoints


def checkpoint_query(job_id: str) -> Select:
    return select(Checkpoint).where(Checkpoint.job_id == job_id)


def checkpoint(session: Session, checkpoint_id: str, *, job_id: str | None = None) -> Checkpoint | None:
    query = select(Checkpoint).where(Checkpoint.id == checkpoint_id)
    return session.scalar(query if job_id is None else query.where(Checkpoint.job_id == job_id))


def checkpoint_at(session: Session, job_id: str, step: int) -> Checkpoint | None:
    return session.scalar(checkpoint_query(job_id).where(Checkpoint.step_number == step))


def checkpoints_by_step(session: Session, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(checkpoint_query(job_id).order_by(Checkpoint.step_number)))


def add_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    session.add(checkpoint)
    session.flush()


def delete_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    session.delete(checkpoint)


def checkpoint_named(session: Session, tenant_id: str, name: str) -> tuple[Checkpoint, Job] | None:
    """The tenant's checkpoint called `name` (ft:…:ckpt-step-N), with its job."""
    row = session.execute(
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.fine_tuned_model_checkpoint == name, Job.tenant_id == tenant_id)
    ).first()
    return (row[0], row[1]) if row else None


# Resume states


def resume_state(session: Session, job_id: str, state_id: str) -> ResumeState | None:
    return session.scalar(select(ResumeState).where(ResumeState.job_id == job_id, ResumeState.id == state_id))


def same_resume_state(session: Session, job: Job, step: int, sha256: str) -> ResumeState | None:
    """The state this attempt already stored for `step` with this sha256, if any (a retried upload)."""
    return session.scalar(
        select(ResumeState).where(
            ResumeState.job_id == job.id,
            ResumeState.attempt == job.attempt,
            ResumeState.step == step,
            ResumeState.sha256 == sha256,
        )
    )


def add_resume_state(session: Session, state: ResumeState) -> None:
    session.add(state)
    session.flush()


def resume_states_newest_first(session: Session, job_id: str) -> list[ResumeState]:
    query = select(ResumeState).where(ResumeState.job_id == job_id).order_by(ResumeState.seq.desc())
    return list(session.scalars(query))


def resume_states_of_ended_jobs(session: Session) -> list[ResumeState]:
    return list(
        session.scalars(
            select(ResumeState)
            .join(Job, Job.id == ResumeState.job_id)
            .where(Job.status.in_([s for s in JobStatus if s.is_final]))
        )
    )


def delete_resume_state(session: Session, state: ResumeState) -> None:
    session.delete(state)
