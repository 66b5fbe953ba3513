"""Storage in an S3 bucket (AWS, MinIO, Ceph, R2: any S3-compatible endpoint), under a key prefix.

Needs phitune[s3] (boto3). Credentials come from where boto3 looks for them (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, a profile, an instance role); none is ever logged. Every call blocks: callers run
them off the event loop (sync routes, the threadpool a streamed body is read in, the housekeeping thread)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from app.storage.base import CHUNK_BYTES, Storage, checked_key

log = logging.getLogger(__name__)
# S3's smallest part but the last is 5 MiB; a blob up to one part goes up in a single PutObject.
PART_BYTES = 8 * 1024 * 1024


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` as (bucket, prefix with a trailing slash, or "")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"storage_url must look like s3://bucket/prefix, not {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Storage(Storage):
    """Commits stream the temp file up in parts (one part in memory at a time); a multipart upload that
    fails is aborted, so no half-written blob or orphaned parts remain."""

    def __init__(
        self,
        url: str,
        temp_dir: Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_bytes: int = PART_BYTES,
    ) -> None:
        super().__init__(temp_dir)
        self.bucket, self.prefix = parse_url(url)
        self.part_bytes = part_bytes
        config = Config(
            retries={"mode": "standard"},
            # Path-style requests and checksums only where required: what MinIO, Ceph and R2 all accept.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def _key(self, key: str) -> str:
        return self.prefix + checked_key(key)

    def commit(self, temp: Path, key: str) -> None:
        try:
            if temp.stat().st_size <= self.part_bytes:
                with temp.open("rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)
            else:
                self._upload_in_parts(temp, self._key(key))
        finally:
            temp.unlink(missing_ok=True)

    def _upload_in_parts(self, temp: Path, name: str) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            parts: list[dict[str, object]] = []
            with temp.open("rb") as body:
                while chunk := body.read(self.part_bytes):
                    number = len(parts) + 1
                    sent = self.client.upload_part(
                        Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=number, Body=chunk
                    )
                    parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
            except Exception:  # the upload's own error is the one to raise; a lifecycle rule is the backstop
                log.exception("could not abort multipart upload %s of %s", upload, name)
            raise

    def size(self, key: str) -> int:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from exc
            raise

    def read(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        if start >= stop:
            return
        wanted = f"bytes={start}-{stop - 1}"
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=wanted)["Body"]
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
