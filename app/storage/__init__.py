"""Blob storage for datasets, checkpoints, resume states and adapters: one interface (`Storage`), two
backends: a local directory under the data dir (the default) or an S3 bucket (`PHITUNE_STORAGE_URL`)."""

from __future__ import annotations

from app.config import Settings
from app.storage.base import Storage
from app.storage.download import blob_response
from app.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "blob_response", "open_storage"]


def open_storage(settings: Settings) -> Storage:
    """The storage `settings` configure."""
    if settings.storage_url is None:
        return LocalStorage(settings.storage_dir)
    try:
        from app.storage.s3 import S3Storage
    except ImportError as exc:
        raise RuntimeError("PHITUNE_STORAGE_URL=s3://… needs phitune[s3] (boto3) installed") from exc
    return S3Storage(
        settings.storage_url,
        settings.storage_dir / "tmp",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
