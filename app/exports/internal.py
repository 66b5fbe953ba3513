"""/internal/v1/exports: the routes a worker makes an export through. The claim takes the shared worker
token; the others the token of the export's running attempt (app.exports.service.current_attempt)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.concurrency import run_in_threadpool

from app.db import release_connection
from app.deps import SessionDep, SettingsDep, StorageDep, WorkerOnly
from app.errors import NotFound
from app.exports import service
from app.internal.contracts import ExportClaimReply, ExportFailure, ExportLease, ExportReceipt
from app.internal.routes import adapter_file
from app.jobs import artifacts
from app.models import Artifact
from app.models.tables import Export

router = APIRouter(prefix="/exports")


def get_current_export(
    export_id: str,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Export:
    return service.current_attempt(session, settings, export_id, authorization)


# The running attempt at the export in the path, proven by its attempt token.
CurrentExport = Annotated[Export, Depends(get_current_export)]


@router.post("/{export_id}/claim", dependencies=[WorkerOnly])
def claim(export_id: str, session: SessionDep, settings: SettingsDep) -> ExportClaimReply:
    return service.claim(session, settings, export_id)


@router.get("/{export_id}/adapter")
def download_adapter(request: Request, export: CurrentExport, session: SessionDep, storage: StorageDep):
    """The job's final adapter, PEFT where it has that form, else loralib (its format in a header)."""
    artifact = artifacts.for_serving(session, export.job_id, Artifact.FINAL)
    if artifact is None:
        raise NotFound(f"Job {export.job_id} has no adapter", code="adapter_not_found")
    return adapter_file(request, storage, artifact)


@router.post("/{export_id}/heartbeat")
def heartbeat(export: CurrentExport, settings: SettingsDep) -> ExportLease:
    return ExportLease(lease_expires_at=service.renew_lease(export, settings))


@router.put("/{export_id}/content")
async def upload_content(
    export_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    sha256: Annotated[str, Query(pattern="^[0-9a-f]{64}$")],
    authorization: Annotated[str | None, Header()] = None,
) -> ExportReceipt:
    """The merged model's tar, streamed to a storage temp file and recorded only if it arrived whole with
    the sha256 the worker computed, and the attempt is still the export's (checked again once it has)."""
    await run_in_threadpool(service.current_attempt, session, settings, export_id, authorization)
    await run_in_threadpool(release_connection, session)  # and the row lock, while the body streams in
    temp, digest, size = await artifacts.receive_archive(request, storage)

    def save() -> ExportReceipt:
        export = service.current_attempt(session, settings, export_id, authorization)
        service.store(session, storage, export, Path(temp), sha256, digest, size)
        return ExportReceipt(bytes=size, sha256=digest)

    try:
        return await run_in_threadpool(save)
    finally:
        temp.unlink(missing_ok=True)


@router.post("/{export_id}/fail", status_code=204)
def fail(body: ExportFailure, export: CurrentExport) -> None:
    """The attempt could not make the merged model: the export has failed, with the worker's reason."""
    service.fail(export, body.message)
