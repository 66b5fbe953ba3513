"""Resume states of a job: stored only once complete, the newest KEEP kept, listed for a new attempt.

A worker uploads a state with the sha256 it computed; the API hashes the bytes as they arrive and records
the state only when both agree, so a truncated or damaged upload never becomes a state anyone loads. An
older state is deleted only after a newer one is complete, and the one before the newest is kept too, so
a state that is damaged later in storage still leaves one to fall back on.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy.orm import Session

from app.db import on_rollback
from app.errors import InvalidRequest, NotFound
from app.internal.contracts import ResumeStateInfo
from app.models import Job, ResumeState
from app.models.base import new_id
from app.repositories import artifacts as stored
from app.storage import Storage

KEEP = 2


def store(
    session: Session,
    storage: Storage,
    job: Job,
    step: int,
    temp: Path,
    claimed_sha256: str,
    sha256: str,
    size: int,
) -> tuple[ResumeState, list[str]]:
    """Record an uploaded state as the job's newest. Returns it and the storage keys of the states it
    supersedes, for the caller to delete once the transaction has committed."""
    if claimed_sha256 != sha256:
        raise InvalidRequest(
            f"The resume state of step {step} arrived with sha256 {sha256}, not {claimed_sha256}: "
            "it is incomplete or damaged and was not stored",
            param="sha256",
            code="state_checksum_mismatch",
        )
    repeated = stored.same_resume_state(session, job, step, sha256)
    if repeated is not None:  # a retry of an upload whose reply was lost: it is stored already
        return repeated, []
    key = f"resume/{job.id}/attempt-{job.attempt}-step-{step}-{secrets.token_hex(6)}.tar"  # one per upload
    storage.commit(temp, key)
    on_rollback(session, lambda: storage.delete(key))  # a blob whose row never commits is removed
    state = ResumeState(
        id=new_id("ftstate"),
        job_id=job.id,
        attempt=job.attempt,
        step=step,
        storage_key=key,
        sha256=sha256,
        bytes=size,
    )
    stored.add_resume_state(session, state)
    job.resumable_step = step
    superseded = stored.resume_states_newest_first(session, job.id)[KEEP:]
    for old in superseded:
        stored.delete_resume_state(session, old)
    return state, [old.storage_key for old in superseded if old.storage_key != key]


def listed(session: Session, job_id: str) -> list[ResumeStateInfo]:
    """The job's complete states, newest first, as a claim hands them to the worker."""
    return [
        ResumeStateInfo(id=state.id, step=state.step, sha256=state.sha256, bytes=state.bytes)
        for state in stored.resume_states_newest_first(session, job_id)
    ]


def get(session: Session, job_id: str, state_id: str) -> ResumeState:
    state = stored.resume_state(session, job_id, state_id)
    if state is None:
        raise NotFound(f"Job {job_id} has no resume state '{state_id}'", code="state_not_found")
    return state


def purge_finished(session: Session) -> list[str]:
    """Delete the states of jobs that ended: nothing will resume them. Returns storage keys to delete."""
    rows = stored.resume_states_of_ended_jobs(session)
    for row in rows:
        stored.delete_resume_state(session, row)
    return [row.storage_key for row in rows]
