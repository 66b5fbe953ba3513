"""Files: accept a validated upload into storage and SQL, look files up, list and delete them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from app import idempotency
from app.db import after_commit, on_rollback
from app.errors import Conflict, InvalidFile, InvalidRequest, NotFound, PayloadTooLarge
from app.files.schemas import FileList
from app.files.split_validation import validate_path
from app.files.upload import FILE_FIELD, ReceivedFile, ReceivedForm
from app.files.validation import Report
from app.models import File
from app.models.base import new_id
from app.pagination import paginate
from app.repositories import files, tenants
from app.storage import Storage

PURPOSES = ("fine-tune",)
"""What a tenant uploads files for: datasets, the only files a job trains on."""
RESULTS_PURPOSE = "fine-tune-results"
"""A job's result file (app.jobs.results), OpenAI's purpose for it: made by the server, never uploaded."""
MEDIA_TYPES = {**dict.fromkeys(PURPOSES, "application/jsonl"), RESULTS_PURPOSE: "text/csv"}
IDEMPOTENCY_ROUTE = "files"


def get_file(session: Session, tenant_id: str, file_id: str, *, param: str = "file_id") -> File:
    """The tenant's file `file_id`; 404 `file_not_found` naming `param` when it is missing or not theirs."""
    row = files.get(session, tenant_id, file_id)
    if row is None:
        raise NotFound(f"No file with id '{file_id}'", param=param, code="file_not_found")
    return row


def get_dataset(session: Session, tenant_id: str, file_id: str, *, param: str) -> File:
    """The tenant's file `file_id` as a job's training or validation file: a 404 as `get_file`, and a 400
    `invalid_file_purpose` naming `param` for a file that is no dataset (a job's result file)."""
    row = get_file(session, tenant_id, file_id, param=param)
    if row.purpose not in PURPOSES:
        raise InvalidRequest(
            f"File {file_id} has purpose '{row.purpose}'; a job trains on a dataset uploaded with purpose "
            f"'{PURPOSES[0]}'",
            param=param,
            code="invalid_file_purpose",
        )
    return row


def create_file(
    session: Session, storage: Storage, tenant_id: str, form: ReceivedForm, *, max_stored_bytes: int = 0
) -> File:
    """Validate an uploaded form's dataset and store it as a new file, within the tenant's `max_stored_bytes`
    (0: no limit). The temp file is consumed either way: moved into storage, or removed on any failure."""
    try:
        received = _required_file(form)
        _check_no_other_fields(form)
        purpose = _checked_purpose(form.fields.get("purpose"))
        report = validate_file(received)
        if not report.ok:
            raise InvalidFile(
                report.summary(received.filename), details=[problem.as_dict() for problem in report.problems]
            )
        check_storage(session, tenant_id, received.bytes, max_stored_bytes)
        return _store(session, storage, tenant_id, received, purpose, report)
    finally:
        form.discard()


def create_file_once(
    session: Session,
    storage: Storage,
    tenant_id: str,
    form: ReceivedForm,
    idempotency_key: str | None,
    *,
    max_stored_bytes: int = 0,
) -> File:
    """`create_file`, except that a retried upload with the same Idempotency-Key returns the first file."""
    request = {
        "sha256": form.file.sha256 if form.file else None,
        "filename": form.file.filename if form.file else None,
        "purpose": form.fields.get("purpose"),
    }
    try:
        return idempotency.create_once(
            session,
            tenant_id,
            IDEMPOTENCY_ROUTE,
            idempotency_key,
            request,
            create=lambda: create_file(session, storage, tenant_id, form, max_stored_bytes=max_stored_bytes),
            object_id=lambda row: row.id,
            load=lambda file_id: get_file(session, tenant_id, file_id),
            discard=lambda row: storage.delete(row.storage_key),  # a concurrent twin's file won
        )
    finally:
        form.discard()


def check_storage(session: Session, tenant_id: str, new_bytes: int, limit: int) -> None:
    """413 `storage_limit_exceeded` when `new_bytes` more would take the tenant past `limit` stored bytes
    (its files, adapter archives and exports; 0: no limit). A 413, not a 429: the SDKs retry a 429 by
    themselves, which would send the whole upload again, in vain until the tenant deletes something. The
    tenant is locked until the upload's row commits, so concurrent uploads cannot pass the limit together."""
    if not limit:
        return
    tenants.lock(session, tenant_id)
    stored = files.stored_bytes(session, tenant_id)
    if stored + new_bytes > limit:
        raise PayloadTooLarge(
            f"This upload of {new_bytes} bytes would take the API key's tenant past its {limit} bytes of "
            f"storage ({stored} in use by its files, adapters and exports); delete files or models first",
            param=FILE_FIELD,
            code="storage_limit_exceeded",
        )


def validate_file(received: ReceivedFile) -> Report:
    """Validate a received file by streaming its lines from disk (a large one in two processes)."""
    return validate_path(received.path, received.bytes)


def list_files(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    after: str | None,
    newest_first: bool,
    purpose: str | None,
) -> FileList:
    """One page of the tenant's files, in the order asked for, optionally only those of one purpose."""
    return paginate(
        session,
        files.list_query(tenant_id, purpose),
        limit=limit,
        after=after,
        newest_first=newest_first,
        into=FileList,
    )


def check_not_in_use(session: Session, row: File) -> None:
    """409 while an unfinished job (queued, running or paused) will still download this file."""
    job_id = files.unfinished_job_using(session, row)
    if job_id is not None:
        raise Conflict(
            f"File {row.id} is an input of job {job_id}, which has not finished; cancel it or wait",
            param="file_id",
            code="file_in_use",
        )


def delete_file(session: Session, storage: Storage, row: File) -> None:
    """Delete a file's row, and its blob once that has committed: a row never points at nothing (nor does
    the job whose result file it was)."""
    if row.purpose == RESULTS_PURPOSE:
        files.forget_result_file(session, row)
    files.delete(session, row)
    after_commit(session, lambda: storage.delete(row.storage_key))


def _required_file(form: ReceivedForm) -> ReceivedFile:
    if form.file is None:
        raise InvalidRequest(
            f"Missing the '{FILE_FIELD}' part: send the JSONL dataset as multipart field '{FILE_FIELD}'",
            param=FILE_FIELD,
            code="missing_required_parameter",
        )
    return form.file


def _check_no_other_fields(form: ReceivedForm) -> None:
    """A field this server would ignore is refused instead, as JSON bodies refuse unknown keys: the SDK's
    `expires_after` (sent as `expires_after[anchor]`, `expires_after[seconds]`) would otherwise be dropped
    and the file kept past the expiry its uploader asked for."""
    for name in form.fields:
        if name != "purpose":
            field = name.split("[", 1)[0]
            raise InvalidRequest(
                f"Unknown field '{field}'; the form takes only 'file' and 'purpose'",
                param=field,
                code="unknown_parameter",
            )


def _checked_purpose(purpose: str | None) -> str:
    if purpose is None:
        raise InvalidRequest(
            "Missing 'purpose'; use 'fine-tune'", param="purpose", code="missing_required_parameter"
        )
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{purpose}'; this server accepts only {', '.join(repr(p) for p in PURPOSES)}",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def store_generated(
    session: Session, storage: Storage, tenant_id: str, *, filename: str, purpose: str, content: bytes
) -> File:
    """Store a file the server made for the tenant (a job's result file): listed, downloadable and deletable
    as an upload, and counted in its stored bytes, though never refused for them (it reports on training
    already done). It has no dataset stats."""
    file_id = new_id("file")
    temp = storage.temp_path()
    temp.write_bytes(content)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        stats={},
        storage_key=f"files/{file_id}{Path(filename).suffix}",
    )
    return _keep(session, storage, row, temp)


def _store(
    session: Session, storage: Storage, tenant_id: str, received: ReceivedFile, purpose: str, report: Report
) -> File:
    """Keep a validated upload."""
    file_id = new_id("file")
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=received.filename,
        purpose=purpose,
        bytes=received.bytes,
        sha256=received.sha256,
        stats=report.stats(),
        storage_key=f"files/{file_id}.jsonl",
    )
    return _keep(session, storage, row, received.path)


def _keep(session: Session, storage: Storage, row: File, temp: Path) -> File:
    """Insert the row and move its blob from `temp` into place; the blob is removed if the row never
    commits."""
    files.add(session, row)
    storage.commit(temp, row.storage_key)
    on_rollback(session, lambda: storage.delete(row.storage_key))
    return row
