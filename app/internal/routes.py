"""/internal/v1: the routes workers use. Excluded from the public OpenAPI document."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from app.deps import SessionDep, SettingsDep, StorageDep
from app.errors import NotFound
from app.files.service import get_file
from app.internal import service

router = APIRouter(prefix="/jobs")
adapters_router = APIRouter(prefix="/adapters")
Authorization = Annotated[str | None, Header()]


class WorkerEvent(BaseModel):
    level: Literal["info", "warn", "error"] = "info"
    type: Literal["message", "metrics"] = "message"
    message: str = Field(max_length=4000)
    data: dict[str, Any] | None = None


class WorkerEvents(BaseModel):
    events: list[WorkerEvent] = Field(max_length=1000)


class WorkerError(BaseModel):
    message: str = Field(max_length=4000)
    code: str | None = None


class Outcome(BaseModel):
    status: Literal["succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    error: WorkerError | None = None


@router.post("/{job_id}/claim")
def claim(job_id: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None):
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
def heartbeat(job_id: str, session: SessionDep, settings: SettingsDep, authorization: Authorization = None):
    return service.renew_lease(service.attempt_job(session, job_id, authorization), settings)


@router.post("/{job_id}/events")
def post_events(
    job_id: str,
    body: WorkerEvents,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Authorization = None,
):
    job = service.attempt_job(session, job_id, authorization)
    service.record_events(session, job, [event.model_dump() for event in body.events])
    return service.renew_lease(job, settings)


@router.put("/{job_id}/adapter")
async def upload_adapter(
    job_id: str,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    authorization: Authorization = None,
):
    """The adapter archive, streamed to storage; replaces any earlier upload of the same attempt."""
    job = service.attempt_job(session, job_id, authorization)
    session.commit()  # release the row lock while the body streams in
    temp, digest, size = storage.temp_path(), hashlib.sha256(), 0
    try:
        with temp.open("wb") as out:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        job.adapter_key = f"adapters/{job.id}/attempt-{job.attempt}.tar.gz"
        storage.commit(temp, job.adapter_key)
    finally:
        temp.unlink(missing_ok=True)
    job.adapter_sha256 = digest.hexdigest()
    return {"bytes": size, "sha256": job.adapter_sha256}


@router.post("/{job_id}/complete")
def complete(job_id: str, body: Outcome, session: SessionDep, authorization: Authorization = None):
    job = service.attempt_job(session, job_id, authorization)
    service.complete_job(session, job, body.model_dump())
    return {"status": job.status}


@adapters_router.get("/{job_id}")
def download_adapter(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    authorization: Authorization = None,
):
    """The inference server fetches a fine-tuned model's adapter here; deleted models are gone."""
    job = service.servable_job(session, settings, job_id, authorization)
    return FileResponse(storage.path(job.adapter_key), media_type="application/gzip")
