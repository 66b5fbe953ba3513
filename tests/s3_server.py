"""A real S3-compatible server for the storage tests: moto's server mode as a process of its own."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from phitune.launch import free_port

# moto accepts any credentials; these are what every client of the tests' server signs with.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "phitune-test",
    "AWS_SECRET_ACCESS_KEY": "phitune-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        name = f"phitune-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object's key in `bucket` under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def object(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def incomplete_uploads(self, bucket: str) -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port, stopped on exit."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            assert process.poll() is None, "moto's server exited at start-up"
            assert time.monotonic() < deadline, "moto's server did not start within 60 s"
            time.sleep(0.2)
        yield S3Server(url)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/moto-api/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
