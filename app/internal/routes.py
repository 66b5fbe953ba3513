"""/internal/v1: the routes workers use. Excluded from the public OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.adapter_format import FORMAT_HEADER, Format
from app.deps import SessionDep, SettingsDep, StorageDep
from app.errors import NotFound
from app.files.service import get_file
from app.internal import service
from app.internal.contracts import (
    CheckpointReport,
    ClaimReply,
    LeaseReply,
    Outcome,
    StateReceipt,
    WorkerEvents,
)
from app.jobs import artifacts, checkpoints, resume_states
from app.models import Artifact, Job
from app.storage import Storage

T = TypeVar("T")
router = APIRouter(prefix="/jobs")
adapters_router = APIRouter(prefix="/adapters")
Authorization = Annotated[str | None, Header()]


@router.post("/{job_id}/claim")
def claim(
    job_id: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None
) -> ClaimReply:
    return service.claim_job(session, settings, job_id, authorization)


@router.get("/{job_id}/files/{file_id}")
def download_file(
    job_id: str, file_id: str, session: SessionDep, storage: StorageDep, authorization: Authorization = None
):
    job = service.attempt_job(session, job_id, authorization)
    if file_id not in (job.training_file, job.validation_file):
        raise NotFound(f"File {file_id} is not an input of job {job_id}", code="file_not_found")
    file = get_file(session, job.tenant_id, file_id)
    return FileResponse(storage.path(file.storage_key), media_type="application/jsonl")


@router.post("/{job_id}/heartbeat")
def heartbeat(
    job_id: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None
) -> LeaseReply:
    return service.renew_lease(service.attempt_job(session, job_id, authorization), settings)


@router.post("/{job_id}/events")
def post_events(
    job_id: str,
    body: WorkerEvents,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Authorization = None,
) -> LeaseReply:
    job = service.attempt_job(session, job_id, authorization)
    service.record_events(session, job, body.events)
    return service.renew_lease(job, settings)


@router.put("/{job_id}/adapter")
async def upload_adapter(
    job_id: str,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    format: Format = "peft",
    authorization: Authorization = None,
):
    """The final adapter archive in one format, streamed to storage; a re-upload replaces it."""
    record = _artifact(session, storage, Artifact.FINAL, format)
    return await _receive(request, session, storage, job_id, authorization, record)


@router.put("/{job_id}/checkpoints/{step}/adapter")
async def upload_checkpoint_adapter(
    job_id: str,
    step: int,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    format: Format = "peft",
    authorization: Authorization = None,
):
    """A checkpoint's adapter archive; the checkpoint is listed once published (POST …/checkpoints)."""
    record = _artifact(session, storage, artifacts.checkpoint_scope(step), format)
    return await _receive(request, session, storage, job_id, authorization, record)


# What an upload records once its bytes are in a temp file: (job, temp, sha256, size) → the reply, and the
# storage keys the new record supersedes (deleted only after the commit).
Record = Callable[[Job, Path, str, int], tuple[T, list[str]]]


async def _receive(
    request: Request,
    session: Session,
    storage: Storage,
    job_id: str,
    authorization: str | None,
    record: Record[T],
) -> T:
    """Stream an upload to a storage temp file, then record it for the attempt, which is checked again: it
    may have been superseded while the body streamed in. A temp file not moved into place is deleted."""
    await run_in_threadpool(service.attempt_job, session, job_id, authorization)
    await run_in_threadpool(session.commit)  # release the row lock while the body streams in
    temp, sha256, size = await artifacts.receive_archive(request, storage)

    def save() -> T:
        job = service.attempt_job(session, job_id, authorization)
        reply, superseded = record(job, temp, sha256, size)
        session.commit()
        for key in superseded:
            storage.delete(key)
        return reply

    try:
        return await run_in_threadpool(save)
    finally:
        temp.unlink(missing_ok=True)


def _artifact(session: Session, storage: Storage, scope: str, fmt: Format) -> Record[dict[str, Any]]:
    """Record an upload as the attempt's adapter archive of `scope` in `fmt`, replacing an earlier one."""

    def record(job: Job, temp: Path, sha256: str, size: int) -> tuple[dict[str, Any], list[str]]:
        replaced = artifacts.save_artifact(session, storage, job, scope, fmt, temp, sha256, size)
        return {"bytes": size, "sha256": sha256}, [replaced] if replaced else []

    return record


@router.post("/{job_id}/checkpoints")
def publish_checkpoint(
    job_id: str,
    body: CheckpointReport,
    session: SessionDep,
    storage: StorageDep,
    authorization: Authorization = None,
):
    """List a checkpoint whose archive is stored, then prune to save_total_limit."""
    job = service.attempt_job(session, job_id, authorization)
    checkpoint = checkpoints.publish(session, job, body.step, body.metrics)
    doomed = checkpoints.prune(session, job)
    session.commit()
    for key in doomed:
        storage.delete(key)
    return checkpoints.render(checkpoint)


@router.post("/{job_id}/complete")
def complete(job_id: str, body: Outcome, session: SessionDep, authorization: Authorization = None):
    job = service.attempt_job(session, job_id, authorization)
    service.complete_job(session, job, body)
    return {"status": job.status}


@router.put("/{job_id}/resume_states")
async def upload_resume_state(
    job_id: str,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    step: Annotated[int, Query(gt=0, le=2**31 - 1)],
    sha256: Annotated[str, Query(pattern="^[0-9a-f]{64}$")],
    authorization: Authorization = None,
) -> StateReceipt:
    """A resume state (see worker.resume_state), streamed to storage and recorded only if every byte arrived
    with the sha256 the worker computed; a mismatch is a 400 and nothing is kept."""

    def record(job: Job, temp: Path, digest: str, size: int) -> tuple[StateReceipt, list[str]]:
        state, superseded = resume_states.store(session, storage, job, step, temp, sha256, digest, size)
        return StateReceipt(id=state.id, step=state.step, sha256=state.sha256, bytes=state.bytes), superseded

    return await _receive(request, session, storage, job_id, authorization, record)


@router.get("/{job_id}/resume_states/{state_id}")
def download_resume_state(
    job_id: str, state_id: str, session: SessionDep, storage: StorageDep, authorization: Authorization = None
):
    job = service.attempt_job(session, job_id, authorization)
    state = resume_states.get(session, job.id, state_id)
    return FileResponse(
        storage.path(state.storage_key), media_type="application/x-tar", headers={"ETag": f'"{state.sha256}"'}
    )


@adapters_router.get("/{adapter_id}")
def download_adapter(
    adapter_id: str,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    authorization: Authorization = None,
):
    """The inference server fetches an adapter here by job or checkpoint id; deleted models are gone."""
    artifact = service.servable_artifact(session, settings, adapter_id, authorization)
    return FileResponse(
        storage.path(artifact.storage_key),
        media_type="application/gzip",
        headers={FORMAT_HEADER: artifact.format, "ETag": f'"{artifact.sha256}"'},
    )
