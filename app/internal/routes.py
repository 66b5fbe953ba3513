"""/internal/v1: the routes workers use. Excluded from the public OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

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
from app.models import Artifact
from app.storage import Storage

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
    format: artifacts.Format = "peft",
    authorization: Authorization = None,
):
    """The final adapter archive in one format, streamed to storage; a re-upload replaces it."""
    return await _receive(request, session, storage, job_id, authorization, Artifact.FINAL, format)


@router.put("/{job_id}/checkpoints/{step}/adapter")
async def upload_checkpoint_adapter(
    job_id: str,
    step: int,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    format: artifacts.Format = "peft",
    authorization: Authorization = None,
):
    """A checkpoint's adapter archive; the checkpoint is listed once published (POST …/checkpoints)."""
    return await _receive(
        request, session, storage, job_id, authorization, artifacts.checkpoint_scope(step), format
    )


async def _receive(
    request: Request,
    session: Session,
    storage: Storage,
    job_id: str,
    authorization: str | None,
    scope: str,
    fmt: artifacts.Format,
) -> dict[str, Any]:
    """Stream an archive to storage, then record it as the attempt's artifact of `scope` in `fmt`."""
    await run_in_threadpool(service.attempt_job, session, job_id, authorization)
    await run_in_threadpool(session.commit)  # release the row lock while the body streams in
    temp, sha256, size = await artifacts.receive_archive(request, storage)
    try:
        await run_in_threadpool(
            _save, session, storage, job_id, authorization, scope, fmt, temp, sha256, size
        )
    finally:
        temp.unlink(missing_ok=True)
    return {"bytes": size, "sha256": sha256}


def _save(
    session: Session,
    storage: Storage,
    job_id: str,
    authorization: str | None,
    scope: str,
    fmt: artifacts.Format,
    temp: Path,
    sha256: str,
    size: int,
) -> None:
    job = service.attempt_job(session, job_id, authorization)  # again: the attempt may be over by now
    replaced = artifacts.save_artifact(session, storage, job, scope, fmt, temp, sha256, size)
    session.commit()
    if replaced:
        storage.delete(replaced)


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
    await run_in_threadpool(service.attempt_job, session, job_id, authorization)
    await run_in_threadpool(session.commit)  # release the row lock while the body streams in
    temp, digest, size = await artifacts.receive_archive(request, storage)
    try:
        return await run_in_threadpool(
            _save_state, session, storage, job_id, authorization, step, temp, sha256, digest, size
        )
    finally:
        temp.unlink(missing_ok=True)


def _save_state(
    session: Session,
    storage: Storage,
    job_id: str,
    authorization: str | None,
    step: int,
    temp: Path,
    claimed_sha256: str,
    sha256: str,
    size: int,
) -> StateReceipt:
    job = service.attempt_job(session, job_id, authorization)  # again: the attempt may be over by now
    state, superseded = resume_states.store(session, storage, job, step, temp, claimed_sha256, sha256, size)
    session.commit()
    for key in superseded:  # only now that the newer state is committed
        storage.delete(key)
    return StateReceipt(id=state.id, step=state.step, sha256=state.sha256, bytes=state.bytes)


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
        headers={"X-Phitune-Adapter-Format": artifact.format, "ETag": f'"{artifact.sha256}"'},
    )
