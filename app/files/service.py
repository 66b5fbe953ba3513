"""Files: accept a validated upload into storage and SQL, look files up, list and delete them."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import idempotency
from app.errors import Conflict, InvalidFile, InvalidRequest, NotFound
from app.files.schemas import FileObject
from app.files.upload import FILE_FIELD, ReceivedFile, ReceivedForm
from app.files.validation import Report, read_lines, validate_lines
from app.models import File, Job, JobStatus
from app.models.base import new_id
from app.pagination import ListPage, paginate
from app.storage import Storage

PURPOSES = ("fine-tune",)
IDEMPOTENCY_ROUTE = "files"


def get_file(session: Session, tenant_id: str, file_id: str, *, param: str = "file_id") -> File:
    """The tenant's file `file_id`; 404 `file_not_found` naming `param` when it is missing or not theirs."""
    row = session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
    if row is None:
        raise NotFound(f"No file with id '{file_id}'", param=param, code="file_not_found")
    return row


def create_file(session: Session, storage: Storage, tenant_id: str, form: ReceivedForm) -> File:
    """Validate an uploaded form's dataset and store it as a new file (committed).
    The temp file is consumed either way: moved into storage, or removed on any failure."""
    try:
        received = _required_file(form)
        purpose = _checked_purpose(form.fields.get("purpose"))
        report = validate_file(received)
        if not report.ok:
            raise InvalidFile(
                report.summary(received.filename), details=[problem.as_dict() for problem in report.problems]
            )
        return _store(session, storage, tenant_id, received, purpose, report)
    finally:
        form.discard()


def create_file_once(
    session: Session, storage: Storage, tenant_id: str, form: ReceivedForm, idempotency_key: str | None
) -> File:
    """`create_file`, except that a retried upload with the same Idempotency-Key returns the first file."""
    if idempotency_key is None:
        return create_file(session, storage, tenant_id, form)
    try:
        key = idempotency.check_key(idempotency_key)
        digest = idempotency.request_hash(
            {
                "sha256": form.file.sha256 if form.file else None,
                "filename": form.file.filename if form.file else None,
                "purpose": form.fields.get("purpose"),
            }
        )
        existing = idempotency.replayed_object_id(session, tenant_id, IDEMPOTENCY_ROUTE, key, digest)
    except BaseException:
        form.discard()
        raise
    if existing:
        form.discard()
        return get_file(session, tenant_id, existing)
    row = create_file(session, storage, tenant_id, form)
    idempotency.remember(session, tenant_id, IDEMPOTENCY_ROUTE, key, digest, row.id)
    try:
        session.commit()
    except IntegrityError:  # a concurrent upload with the same key won: keep its file, drop this one
        session.rollback()
        delete_file(session, storage, row)
        existing = idempotency.replayed_object_id(session, tenant_id, IDEMPOTENCY_ROUTE, key, digest)
        return get_file(session, tenant_id, existing)
    return row


def validate_file(received: ReceivedFile) -> Report:
    """Validate a received file by streaming its lines from disk."""
    with received.path.open("rb") as stream:
        return validate_lines(read_lines(stream))


def list_files(
    session: Session, tenant_id: str, *, limit: int, after: str | None, purpose: str | None
) -> ListPage:
    """One page of the tenant's files, newest first, optionally only those of one purpose."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return paginate(
        session, query, File, limit=limit, after=after, newest_first=True, render=FileObject.from_row
    )


def check_not_in_use(session: Session, row: File) -> None:
    """409 while an unfinished job will still download this file."""
    job_id = session.scalar(
        select(Job.id).where(
            Job.tenant_id == row.tenant_id,
            or_(Job.training_file == row.id, Job.validation_file == row.id),
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
    )
    if job_id is not None:
        raise Conflict(
            f"File {row.id} is an input of job {job_id}, which has not finished; cancel it or wait",
            param="file_id",
            code="file_in_use",
        )


def delete_file(session: Session, storage: Storage, row: File) -> None:
    """Delete a file's row, then its blob (committed), so a failure never leaves a row without content."""
    session.delete(row)
    session.commit()
    storage.delete(row.storage_key)


def _required_file(form: ReceivedForm) -> ReceivedFile:
    if form.file is None:
        raise InvalidRequest(
            f"Missing the '{FILE_FIELD}' part: send the JSONL dataset as multipart field '{FILE_FIELD}'",
            param=FILE_FIELD,
            code="missing_required_parameter",
        )
    return form.file


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


def _store(
    session: Session, storage: Storage, tenant_id: str, received: ReceivedFile, purpose: str, report: Report
) -> File:
    """Insert the row and move the blob into place; commits so that the blob is removed if the row is not."""
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
    session.add(row)
    session.flush()
    storage.commit(received.path, row.storage_key)
    try:
        session.commit()
    except BaseException:
        storage.delete(row.storage_key)
        raise
    return row
