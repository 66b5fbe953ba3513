"""/v1/files: upload, list, retrieve, download and delete datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.db import release_connection
from app.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from app.errors import error_responses
from app.files import report, service, split_validation
from app.files.schemas import FileDeleted, FileList, FileObject, FileReport
from app.files.upload import receive_form
from app.limits import MAX_SEQ_LENGTH, MIN_SEQ_LENGTH
from app.openapi_parts import After, IdempotencyKey, Limit, Order
from app.storage import blob_response

router = APIRouter(prefix="/files", tags=["files"], responses=error_responses(401, 429, 503))

# The body is parsed by hand (see app.files.upload), so FastAPI cannot derive its schema; describe it here.
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "additionalProperties": False,  # another field (OpenAI's `expires_after`) is a 400
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The JSONL dataset."},
                    "purpose": {"type": "string", "enum": list(service.PURPOSES)},
                },
            }
        }
    },
}


@router.post(
    "",
    response_model=FileObject,
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses=error_responses(400, 413, 415, 422),
)
async def create_file(
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> FileObject:
    """Upload a JSONL dataset; it is streamed to storage, validated line by line, and stored only if valid."""
    # End the auth query's transaction so the pooled connection is not held while a large body streams in.
    await run_in_threadpool(release_connection, session)
    if _declared_bytes(request) >= split_validation.SPLIT_MIN_BYTES:
        split_validation.warm_up()  # its second validating process starts while the body arrives
    form = await receive_form(request, storage.temp_path(), max_file_bytes=settings.max_upload_bytes)
    row = await run_in_threadpool(
        service.create_file_once,
        session,
        storage,
        tenant.id,
        form,
        idempotency_key,
        max_stored_bytes=settings.max_stored_bytes_per_tenant,
    )
    return FileObject.from_row(row)


def _declared_bytes(request: Request) -> int:
    length = request.headers.get("content-length", "")
    return int(length) if length.isascii() and length.isdigit() else 0  # receive_form answers a bad one


@router.get("", response_model=FileList, responses=error_responses(400))
def list_files(
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
    order: Order = "desc",
    purpose: str | None = None,
) -> FileList:
    """The tenant's files, newest first (`order=asc`: oldest first); `after` is the last id of the previous
    page in either order."""
    return service.list_files(
        session, tenant.id, limit=limit, after=after, newest_first=order == "desc", purpose=purpose
    )


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
def retrieve_file(file_id: str, tenant: CurrentTenant, session: SessionDep) -> FileObject:
    """One of the tenant's files."""
    return FileObject.from_row(service.get_file(session, tenant.id, file_id))


@router.get("/{file_id}/report", response_model=FileReport, responses=error_responses(400, 404))
def file_report(
    file_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=200, description="Default: the first base model")] = None,
    max_seq_length: Annotated[int, Query(ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH)] = 2048,
    train_on_inputs: bool = False,
) -> FileReport:
    """The dataset's report for a base model: examples, tokens per example with its tokenizer, supervised
    tokens, what max_seq_length would cut, duplicates and empty replies. Computed on the first request (a
    plain route, run off the event loop), then read from storage."""
    row = service.get_dataset(session, tenant.id, file_id, param="file_id")
    key = report.report_key(settings, model, max_seq_length, train_on_inputs)
    release_connection(session)  # a large file takes a while: hold no pooled connection meanwhile
    return FileReport(file_id=row.id, **report.dataset_report(storage, row, key).report)


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in service.MEDIA_TYPES.values()
            }
        },
        304: {"description": "Not modified"},
        **error_responses(404),
    },
)
def download_file_content(
    file_id: str, request: Request, tenant: CurrentTenant, session: SessionDep, storage: StorageDep
) -> Response:
    """The dataset as uploaded, or a job's result file (CSV). The ETag is its sha256, so a client can verify
    or cache it."""
    row = service.get_file(session, tenant.id, file_id)
    return blob_response(
        request,
        storage,
        row.storage_key,
        etag=f'"{row.sha256}"',
        media_type=service.MEDIA_TYPES[row.purpose],
        filename=row.filename,
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409))
def delete_file(file_id: str, tenant: CurrentTenant, session: SessionDep, storage: StorageDep) -> FileDeleted:
    """Delete a file and its content (a job's result file too); refused (409) while a queued, running or
    paused job still needs it."""
    row = service.get_file(session, tenant.id, file_id)
    service.check_not_in_use(session, row)
    service.delete_file(session, storage, row)
    return FileDeleted(id=row.id)
