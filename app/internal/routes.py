"""/internal/v1: the routes workers use. Excluded from the public OpenAPI document.

The claim takes the shared worker token (`WorkerOnly`), the adapter download the inference server's serving
token (`ServingOnly`); everything else is done by one attempt of one job, proven by its attempt token
(`CurrentAttempt`). See app.service_auth."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.adapter_format import FORMAT_HEADER, Format
from app.config import Settings
from app.db import after_commit, release_connection
from app.deps import CurrentAttempt, ServingOnly, SessionDep, SettingsDep, StorageDep, WorkerOnly
from app.errors import NotFound
from app.files.service import get_file
from app.inference import unload_adapter
from app.internal import service
from app.internal.contracts import (
    AdapterReceipt,
    CheckpointReport,
    ClaimReply,
    CompleteReply,
    LeaseReply,
    Outcome,
    StateReceipt,
    WorkerEvents,
)
from app.internal.service import Attempt
from app.jobs import artifacts, checkpoints, init_from, resume_states
from app.jobs.schemas import JobCheckpoint
from app.limits import MAX_REPORTED_STEP
from app.models import Artifact, Job
from app.repositories import artifacts as stored
from app.storage import Storage, blob_response

T = TypeVar("T")
# A checkpoint's step in the path, bounded as CheckpointReport's (a route checks its own parameters).
Step = Annotated[int, PathParam(gt=0, le=MAX_REPORTED_STEP)]
router = APIRouter(prefix="/jobs")
adapters_router = APIRouter(prefix="/adapters")


@router.post("/{job_id}/claim", dependencies=[WorkerOnly])
def claim(job_id: str, session: SessionDep, settings: SettingsDep) -> ClaimReply:
    return service.claim_job(session, settings, job_id)


@router.get("/{job_id}/files/{file_id}")
def download_file(
    file_id: str, request: Request, attempt: CurrentAttempt, session: SessionDep, storage: StorageDep
):
    job = attempt.job
    if file_id not in (job.training_file, job.validation_file):
        raise NotFound(f"File {file_id} is not an input of job {job.id}", code="file_not_found")
    file = get_file(session, job.tenant_id, file_id)
    return blob_response(
        request, storage, file.storage_key, etag=f'"{file.sha256}"', media_type="application/jsonl"
    )


@router.post("/{job_id}/heartbeat")
def heartbeat(attempt: CurrentAttempt, settings: SettingsDep) -> LeaseReply:
    return service.renew_lease(attempt.job, settings)


@router.post("/{job_id}/events")
def post_events(
    body: WorkerEvents, attempt: CurrentAttempt, session: SessionDep, settings: SettingsDep
) -> LeaseReply:
    service.record_events(session, attempt.job, body.events)
    return service.renew_lease(attempt.job, settings)


@router.put("/{job_id}/adapter")
async def upload_adapter(
    request: Request,
    attempt: CurrentAttempt,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    format: Format = "peft",
) -> AdapterReceipt:
    """The final adapter archive in one format, streamed to storage; a re-upload replaces it."""
    record = _artifact(session, storage, Artifact.FINAL, format)
    return await _receive(request, session, settings, storage, attempt, record)


@router.put("/{job_id}/checkpoints/{step}/adapter")
async def upload_checkpoint_adapter(
    step: Step,
    request: Request,
    attempt: CurrentAttempt,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    format: Format = "peft",
) -> AdapterReceipt:
    """A checkpoint's adapter archive; the checkpoint is listed once published (POST …/checkpoints). A
    re-upload (a resumed attempt trains the step again) replaces it, and the inference engine drops the copy
    it may have loaded of the one replaced once the new one has committed, so the next load fetches the new
    one (a load already under way finishes for the requests waiting on it, then is dropped)."""
    record = _artifact(session, storage, artifacts.checkpoint_scope(step), format)

    def record_and_unload(job: Job, temp: Path, sha256: str, size: int) -> tuple[AdapterReceipt, list[str]]:
        receipt, replaced = record(job, temp, sha256, size)
        if replaced and (published := stored.checkpoint_at(session, job.id, step)) is not None:
            after_commit(session, partial(unload_adapter, settings, published.id))
        return receipt, replaced

    return await _receive(request, session, settings, storage, attempt, record_and_unload)


# What an upload records once its bytes are in a temp file: (job, temp, sha256, size) → the reply, and the
# storage keys the new record supersedes (deleted only after the commit).
Record = Callable[[Job, Path, str, int], tuple[T, list[str]]]


async def _receive(
    request: Request,
    session: Session,
    settings: Settings,
    storage: Storage,
    attempt: Attempt,
    record: Record[T],
) -> T:
    """Stream an upload to a storage temp file, then record it for the attempt, which is checked again: it
    may have been superseded while the body streamed in. A temp file not moved into place is deleted."""
    await run_in_threadpool(release_connection, session)  # and the row lock, while the body streams in
    temp, sha256, size = await artifacts.receive_archive(request, storage)

    def save() -> T:
        job = service.attempt_job(session, settings, attempt.job.id, attempt.token)
        reply, superseded = record(job, temp, sha256, size)
        for key in superseded:
            after_commit(session, partial(storage.delete, key))
        return reply

    try:
        return await run_in_threadpool(save)
    finally:
        temp.unlink(missing_ok=True)


def _artifact(session: Session, storage: Storage, scope: str, fmt: Format) -> Record[AdapterReceipt]:
    """Record an upload as the attempt's adapter archive of `scope` in `fmt`, replacing an earlier one."""

    def record(job: Job, temp: Path, sha256: str, size: int) -> tuple[AdapterReceipt, list[str]]:
        replaced = artifacts.save_artifact(session, storage, job, scope, fmt, temp, sha256, size)
        return AdapterReceipt(bytes=size, sha256=sha256), [replaced] if replaced else []

    return record


@router.post("/{job_id}/checkpoints")
def publish_checkpoint(
    body: CheckpointReport, attempt: CurrentAttempt, session: SessionDep, storage: StorageDep
) -> JobCheckpoint:
    """List a checkpoint whose archive is stored, then prune to save_total_limit."""
    checkpoint = checkpoints.publish(session, attempt.job, body.step, body.metrics)
    for key in checkpoints.prune(session, attempt.job):
        after_commit(session, partial(storage.delete, key))
    return JobCheckpoint.from_row(checkpoint)


@router.post("/{job_id}/complete")
def complete(
    body: Outcome, attempt: CurrentAttempt, session: SessionDep, storage: StorageDep
) -> CompleteReply:
    service.complete_job(session, storage, attempt.job, body)
    return CompleteReply(status=attempt.job.status)


@router.put("/{job_id}/resume_states")
async def upload_resume_state(
    request: Request,
    attempt: CurrentAttempt,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    step: Annotated[int, Query(gt=0, le=MAX_REPORTED_STEP)],
    sha256: Annotated[str, Query(pattern="^[0-9a-f]{64}$")],
) -> StateReceipt:
    """A resume state (see worker.resume_state), streamed to storage and recorded only if every byte arrived
    with the sha256 the worker computed; a mismatch is a 400 and nothing is kept."""

    def record(job: Job, temp: Path, digest: str, size: int) -> tuple[StateReceipt, list[str]]:
        state, superseded = resume_states.store(session, storage, job, step, temp, sha256, digest, size)
        return StateReceipt(id=state.id, step=state.step, sha256=state.sha256, bytes=state.bytes), superseded

    return await _receive(request, session, settings, storage, attempt, record)


@router.get("/{job_id}/resume_states/{state_id}")
def download_resume_state(
    state_id: str, request: Request, attempt: CurrentAttempt, session: SessionDep, storage: StorageDep
):
    state = resume_states.get(session, attempt.job.id, state_id)
    return blob_response(
        request, storage, state.storage_key, etag=f'"{state.sha256}"', media_type="application/x-tar"
    )


@router.get("/{job_id}/init_from")
def download_init_adapter(
    request: Request, attempt: CurrentAttempt, session: SessionDep, storage: StorageDep
):
    """The adapter the job continues from (training_config.init_from): the one adapter its attempt may
    fetch; 404 once that model is deleted."""
    return adapter_file(request, storage, init_from.source_artifact(session, attempt.job))


@adapters_router.get("/{adapter_id}", dependencies=[ServingOnly])
def download_adapter(adapter_id: str, request: Request, session: SessionDep, storage: StorageDep):
    """The inference server fetches an adapter here by job or checkpoint id; deleted models are gone."""
    return adapter_file(request, storage, service.servable_artifact(session, adapter_id))


def adapter_file(request: Request, storage: Storage, artifact: Artifact) -> Response:
    """An adapter's archive for a worker or the inference server, its format in a header."""
    return blob_response(
        request,
        storage,
        artifact.storage_key,
        etag=f'"{artifact.sha256}"',
        media_type="application/gzip",
        headers={FORMAT_HEADER: artifact.format},
    )
