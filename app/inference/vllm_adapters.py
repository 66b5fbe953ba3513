"""Adapters unpacked where vLLM reads them: `PHITUNE_VLLM_ADAPTER_DIR/<adapter id>/`, holding the PEFT files
of the adapter's archive (vLLM loads a directory, never an archive, and only the PEFT format).

The API unpacks from its own storage, so S3 or a local directory makes no difference to vLLM; the directory
must be shared with vLLM at the same path (a volume of both containers, or one machine). A directory is
complete once it exists: files are written beside it and renamed into place in one step."""

from __future__ import annotations

import re
import secrets
import shutil
import tarfile
from pathlib import Path

from app.adapter_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from app.config import Settings
from app.db import session_scope
from app.errors import APIError, NotFound, ServiceUnavailable
from app.internal.service import servable_artifact
from app.repositories import jobs
from app.storage.base import Storage

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")  # job and checkpoint ids: one path component
MAX_MEMBERS = 64  # a packed format holds a handful of files
MAX_FILE_BYTES = 8 * 1024**3  # far above any LoRA vLLM could hold
UNPACK_TRIES = 3  # an archive replaced while it is unpacked, each time
SOURCE_FILE = ".phitune-source"  # the storage key of the archive a directory holds (vLLM ignores it)


class UnservableAdapter(APIError):
    """The model exists but this engine cannot serve its adapter."""

    status_code = 422
    error_type = "invalid_request_error"
    default_code = "invalid_adapter"


def adapter_root(settings: Settings) -> Path:
    return (settings.vllm_adapter_dir or settings.data_dir / "vllm-adapters").resolve()


def adapter_path(settings: Settings, adapter_id: str) -> Path:
    if not SAFE_ID.fullmatch(adapter_id):
        raise NotFound(f"The model '{adapter_id}' does not exist", param="model", code="model_not_found")
    return adapter_root(settings) / adapter_id


def unpack(settings: Settings, storage: Storage, adapter_id: str) -> Path:
    """The adapter's directory for vLLM, unpacked from storage unless it already is (blocking).

    An archive replaced while it was unpacked (a resumed attempt uploads a checkpoint's adapter again) is
    unpacked again: the replacement's unload (`remove`, after its commit) may have run before this directory
    existed, so once it is in place the archive is looked up again, and the directory kept only if it holds
    that archive (the storage key it came from is written beside its files)."""
    target = adapter_path(settings, adapter_id)
    if target.is_dir():
        return target
    for _ in range(UNPACK_TRIES):
        _unpack_into(storage, _servable_key(settings, adapter_id), target)
        if _unpacked_key(target) == _servable_key(settings, adapter_id):
            return target
        remove(settings, adapter_id)
    raise ServiceUnavailable(f"The adapter of '{adapter_id}' changed while it was being loaded; try again")


def _servable_key(settings: Settings, adapter_id: str) -> str:
    """The storage key of the adapter's PEFT archive; 404 or 422 when there is none."""
    with session_scope(settings.resolved_database_url) as session:
        artifact = servable_artifact(session, adapter_id)
        if artifact.format != "peft":
            job = jobs.get(session, artifact.job_id)
            reason = job.peft_unavailable_reason if job else None
            raise UnservableAdapter(
                f"The adapter of '{adapter_id}' exists only in loralib format"
                + (f" ({reason})" if reason else "")
                + "; vLLM serves PEFT adapters only. Serve it with PHITUNE_INFERENCE_ENGINE=phitune.",
                param="model",
            )
        return artifact.storage_key


def _unpack_into(storage: Storage, key: str, target: Path) -> None:
    """The archive at `key`, extracted beside `target` and renamed into place in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = storage.temp_path()
    partial = target.parent / f".{target.name}.{secrets.token_hex(4)}"
    try:
        with archive.open("wb") as out:
            for chunk in storage.read(key, 0, storage.size(key)):
                out.write(chunk)
        partial.mkdir()
        _extract_peft(archive, partial)
        (partial / SOURCE_FILE).write_text(key)
        try:
            partial.rename(target)
        except OSError:  # another request unpacked it meanwhile
            if not target.is_dir():
                raise
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(partial, ignore_errors=True)


def _unpacked_key(target: Path) -> str | None:
    try:
        return (target / SOURCE_FILE).read_text()
    except OSError:  # removed meanwhile
        return None


def remove(settings: Settings, adapter_id: str) -> None:
    shutil.rmtree(adapter_path(settings, adapter_id), ignore_errors=True)


def _extract_peft(archive: Path, directory: Path) -> None:
    """Only the two PEFT files, as plain files under their own names: nothing else of an archive is ever
    written (no path from it, no link, no pickle), and no file past MAX_FILE_BYTES."""
    wanted = {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}
    with tarfile.open(archive, "r:gz") as tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS:
                break
            if member.name not in wanted or not member.isfile() or member.size > MAX_FILE_BYTES:
                continue
            source = tar.extractfile(member)
            assert source is not None  # a regular file's
            with source, (directory / member.name).open("wb") as out:
                shutil.copyfileobj(source, out)
            wanted.discard(member.name)
    if wanted:
        raise UnservableAdapter(
            f"The adapter archive lacks {', '.join(sorted(wanted))}, which vLLM needs", param="model"
        )
