"""/v1/fine_tuning/jobs/{id}/exports: request a job's merged model, follow it, download it."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.broker import queue_routes
from app.config import Settings
from app.db import after_commit
from app.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from app.errors import error_responses
from app.exports import messages, service
from app.exports.schemas import ExportCreate, JobExport, JobExportList
from app.jobs.outbox import queued_messages
from app.jobs.service import get_job
from app.models.tables import Export
from app.storage import blob_response

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(401, 429, 503))
MERGED_ARCHIVE = {
    "description": "The merged model as a tar of a Hugging Face directory",
    "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
}
DONE = (Export.SUCCEEDED, Export.FAILED)


@router.post(
    "/{fine_tuning_job_id}/exports",
    response_model=JobExport,
    status_code=202,
    responses={
        200: {"model": JobExport, "description": "The export, already made"},
        **error_responses(400, 404, 409, 413),
    },
)
def create_export(
    fine_tuning_job_id: str,
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    body: ExportCreate | None = None,
) -> JobExport:
    """Export the job's base model with its adapter merged in, made by a worker: 202 while it is made. A
    request while an export in the format is queued, running or succeeded answers with that export; after
    a failure it makes a new one."""
    return _requested(
        request,
        response,
        session,
        settings,
        tenant.id,
        fine_tuning_job_id,
        (body or ExportCreate()).format,  # no body: the default format
        retry_failed=True,
    )


@router.get(
    "/{fine_tuning_job_id}/merged",
    response_model=JobExport,
    status_code=202,
    responses={
        200: {"model": JobExport, "description": "The export, made"},
        **error_responses(404, 409, 413),
    },
)
def merged(
    fine_tuning_job_id: str,
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
) -> JobExport:
    """The job's newest merged export, requested if there is none: 202 until it has succeeded or failed,
    then 200 (a failed one stays the answer: a POST to `…/exports` tries again). Its content is at
    `…/exports/{id}/content`."""
    return _requested(
        request, response, session, settings, tenant.id, fine_tuning_job_id, "merged", retry_failed=False
    )


@router.get("/{fine_tuning_job_id}/exports", response_model=JobExportList, responses=error_responses(404))
def list_exports(
    fine_tuning_job_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
) -> JobExportList:
    """The job's exports, newest first."""
    job = get_job(session, tenant.id, fine_tuning_job_id)
    found = service.exports_of(session, job.id)
    for export in found:
        _recover(request, session, settings, export, job.model)
    data = [JobExport.from_row(export) for export in found]
    return JobExportList(
        data=data,
        has_more=False,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get(
    "/{fine_tuning_job_id}/exports/{export_id}", response_model=JobExport, responses=error_responses(404)
)
def get_export(
    fine_tuning_job_id: str,
    export_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
) -> JobExport:
    job = get_job(session, tenant.id, fine_tuning_job_id)
    export = service.get(session, job, export_id)
    _recover(request, session, settings, export, job.model)
    return JobExport.from_row(export)


@router.get(
    "/{fine_tuning_job_id}/exports/{export_id}/content",
    response_class=StreamingResponse,
    responses={200: MERGED_ARCHIVE, **error_responses(404, 409)},
)
def download_export(
    fine_tuning_job_id: str,
    export_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
):
    """The merged model as a plain tar (safetensors compress poorly) of a Hugging Face directory:
    `AutoModelForCausalLM.from_pretrained` loads it once extracted. Range and ETag work."""
    job = get_job(session, tenant.id, fine_tuning_job_id)
    export = service.get(session, job, export_id)
    name = (job.fine_tuned_model or job.id).replace(":", "_")
    return blob_response(
        request,
        storage,
        service.content(export),
        etag=f'"{export.sha256}"',
        media_type="application/x-tar",
        filename=f"{name}.{export.format}.tar",
    )


def _requested(
    request: Request,
    response: Response,
    session: Session,
    settings: Settings,
    tenant_id: str,
    job_id: str,
    fmt: str,
    *,
    retry_failed: bool,
) -> JobExport:
    job = get_job(session, tenant_id, job_id)
    export, created = service.request_export(
        session,
        job,
        fmt,
        retry_failed=retry_failed,
        max_stored_bytes=settings.max_stored_bytes_per_tenant,
    )
    if created:
        after_commit(session, partial(messages.send, request.app.state.messages.celery, export.id, job.model))
    else:
        _recover(request, session, settings, export, job.model)
    if export.status in DONE:
        response.status_code = 200
    return JobExport.from_row(export)


def _recover(request: Request, session: Session, settings: Settings, export: Export, model: str) -> None:
    """Retry an export (of a job on base `model`) whose worker or message was lost (service.refresh), its
    message sent once committed."""
    celery = request.app.state.messages.celery
    if service.refresh(session, settings, export, _broker_empty(celery, model)):
        after_commit(session, partial(messages.send, celery, export.id, model))


def _broker_empty(celery, model: str) -> Callable[[], bool]:
    def empty() -> bool:
        try:
            return queued_messages(celery, queue_routes(celery).queue(model)) == 0
        except Exception:  # a broker that does not answer: the next read asks again
            return False

    return empty
