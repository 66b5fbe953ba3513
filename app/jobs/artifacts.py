"""Adapter archives of a job (its final adapter and its checkpoints), one per download format."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from sqlalchemy.orm import Session
from starlette.requests import Request

from app.adapter_format import FORMATS, Format
from app.db import on_rollback
from app.errors import Conflict, InvalidRequest, NotFound
from app.models import Artifact, Job, JobStatus
from app.repositories import artifacts as stored
from app.storage import Storage


def fine_tuned_model_name(job: Job) -> str:
    """The model id a job's adapter is called by, e.g. `ft:tiny-phi3:support-bot:3f9a2b1c4d5e`."""
    tag = f"{job.suffix}:" if job.suffix else ""
    return f"ft:{job.model}:{tag}{job.id.removeprefix('ftjob-')[:12]}"


def checkpoint_model_name(job: Job, step: int) -> str:
    return f"{fine_tuned_model_name(job)}:ckpt-step-{step}"


def checkpoint_scope(step: int) -> str:
    """Archives of a checkpoint are stored under its step, before the checkpoint itself is published."""
    return f"step-{step}"


async def receive_archive(request: Request, storage: Storage) -> tuple[Path, str, int]:
    """Stream a request body to a storage temp file; returns its path, sha256 and size."""
    temp, digest, size = storage.temp_path(), hashlib.sha256(), 0
    try:
        with temp.open("wb") as out:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, digest.hexdigest(), size


def save_artifact(
    session: Session, storage: Storage, job: Job, scope: str, fmt: Format, temp: Path, sha256: str, size: int
) -> str | None:
    """Move an uploaded archive into place as the job's `scope` artifact in `fmt`. Returns the storage key of
    an archive it replaced, for the caller to delete once the transaction has committed."""
    # A key of its own per upload: removing it when its row does not commit never touches another's blob
    # (two copies of one upload, retried while the first still ran, race for the same row).
    key = f"adapters/{job.id}/{scope}-attempt-{job.attempt}-{secrets.token_hex(6)}.{fmt}.tar.gz"
    artifact = stored.find_artifact(session, job.id, scope, fmt)
    storage.commit(temp, key)
    on_rollback(session, lambda: storage.delete(key))
    if artifact is None:
        stored.add_artifact(
            session,
            Artifact(job_id=job.id, scope=scope, format=fmt, storage_key=key, sha256=sha256, bytes=size),
        )
        return None
    replaced = artifact.storage_key
    artifact.storage_key, artifact.sha256, artifact.bytes = key, sha256, size
    return replaced


def formats_of(session: Session, job_id: str, scope: str = Artifact.FINAL) -> list[str]:
    return stored.formats(session, job_id, scope)


def for_download(session: Session, job: Job, *, fmt: str | None, checkpoint_id: str | None) -> Artifact:
    """The archive asked for (PEFT unless `fmt` says otherwise), or a clear error saying why there is none."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest(
            f"format must be one of {', '.join(FORMATS)}", param="format", code="invalid_value"
        )
    scope = Artifact.FINAL
    if checkpoint_id is not None:
        checkpoint = stored.checkpoint(session, checkpoint_id, job_id=job.id)
        if checkpoint is None:
            raise NotFound(f"Job {job.id} has no checkpoint '{checkpoint_id}'", param="checkpoint")
        scope = checkpoint_scope(checkpoint.step_number)
    elif job.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"Job {job.id} is {job.status}; its adapter exists once it has succeeded",
            code="adapter_not_ready",
        )
    wanted = fmt or "peft"
    artifact = stored.find_artifact(session, job.id, scope, wanted)
    if artifact is None:
        available = formats_of(session, job.id, scope)
        reason = job.peft_unavailable_reason if wanted == "peft" and job.peft_unavailable_reason else None
        raise Conflict(
            reason or f"No {wanted} form of this adapter; available: {', '.join(available) or 'none'}",
            param="format",
            code="format_unavailable",
        )
    return artifact


def for_serving(session: Session, job_id: str, scope: str) -> Artifact | None:
    """The archive the inference server loads: PEFT when there is one, else loralib."""
    return stored.find_artifact(session, job_id, scope, "peft") or stored.find_artifact(
        session, job_id, scope, "loralib"
    )
