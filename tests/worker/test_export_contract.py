"""The export worker's requests against the API's own routes (as tests/worker/test_contract.py checks the
training worker's): each call of `worker.client.ExportClient` must reach an /internal/v1/exports route with
parameters and a body that route accepts, and together they reach every one of them."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import httpx
from fastapi.routing import APIRoute

from app.adapter_format import FORMAT_HEADER
from app.internal.contracts import ExportClaimReply, ExportLease, ExportReceipt
from tests.worker.test_contract import INTERNAL, api_routes, check_against_api
from worker.client import ExportClient

__all__ = ["api_routes"]  # the fixture, shared with test_contract
CLAIM = ExportClaimReply(
    export_id="ftexp-1",
    job_id="ftjob-1",
    attempt=1,
    token="1.secret",
    model="tiny-phi3",
    heartbeat_seconds=10,
    lease_seconds=120,
)


def test_every_request_of_the_export_worker_validates_against_the_api_schema(
    api_routes: list[APIRoute], tmp_path: Path
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.endswith("/claim"):
            return httpx.Response(200, json=CLAIM.model_dump())
        if path.endswith("/adapter"):
            return httpx.Response(200, content=b"archive", headers={FORMAT_HEADER: "peft"})
        if path.endswith("/heartbeat"):
            return httpx.Response(200, json=ExportLease(lease_expires_at=1).model_dump())
        if path.endswith("/fail"):
            return httpx.Response(204)
        request.read()
        return httpx.Response(200, json=ExportReceipt(bytes=3, sha256="0" * 64).model_dump())

    archive = tmp_path / "merged.tar"
    archive.write_bytes(b"tar")
    client = ExportClient("http://api.invalid", "test-worker-token", transport=httpx.MockTransport(handler))
    calls = {
        "claim": lambda: client.claim(CLAIM.export_id),
        "download_adapter": lambda: client.download_adapter(tmp_path / "adapter.tar.gz"),
        "heartbeat": client.heartbeat,
        "upload": lambda: client.upload(archive, hashlib.sha256(b"tar").hexdigest()),
        "fail": lambda: client.fail("x" * 5000),
    }
    methods = inspect.getmembers(ExportClient, inspect.isfunction)
    public = {name for name, _ in methods if not name.startswith("_")}
    assert set(calls) == public - {"close"}, "a call of ExportClient is not driven here"
    served = set()
    for name, call in calls.items():
        before = len(seen)
        call()
        assert len(seen) > before, f"{name} sent nothing"
        served |= {check_against_api(request, api_routes).path for request in seen[before:]}
    client.close()
    assert served == {route.path for route in api_routes if route.path.startswith(f"{INTERNAL}/exports/")}
    assert seen[-2].content == b"tar"  # the upload's body, streamed from the file
