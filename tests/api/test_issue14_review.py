"""Issue 14 review: a request's path cannot forge access-log lines; a deleted model's adapter files for vLLM
go even when vLLM cannot be reached; vLLM's model list unreadable is a 503; a bucket boto3 refuses stops the
settings."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.config import Settings
from app.errors import ServiceUnavailable
from app.inference import unload_adapter
from app.inference.vllm import CHAT, MODELS, VllmEngine
from app.inference.vllm_adapters import adapter_path
from app.inference_contract import GenerateBody
from app.request_id import RequestId
from app.storage import LocalStorage


def test_a_newline_in_the_path_stays_on_the_access_line(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(routes=[Route("/{rest:path}", lambda _: PlainTextResponse("ok"), methods=["POST"])])
    with TestClient(RequestId(app, access_log="all")) as client, caplog.at_level(logging.INFO, "app.access"):
        client.post('/v1/files%0A127.0.0.1:1 - "DELETE /v1/models/x HTTP/1.1" 200')
    (line,) = [record.getMessage() for record in caplog.records if record.name == "app.access"]
    assert "\n" not in line and "/v1/files%0A127.0.0.1" in line


def test_unloading_removes_the_unpacked_adapter_when_vllm_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(
        data_dir=tmp_path,
        inference_engine="vllm",
        inference_url=f"http://127.0.0.1:{port}",
        inference_token="t" * 32,
    )
    unpacked = adapter_path(settings, "ftjob-gone")
    unpacked.mkdir(parents=True)
    (unpacked / "adapter_model.safetensors").write_bytes(b"weights")
    unload_adapter(settings, "ftjob-gone")  # logs that vLLM could not be told
    assert not unpacked.exists()


@pytest.mark.parametrize("url", ["s3://bucket:9000/prefix", "s3://my bucket/prefix", "s3://bucket?x=1"])
def test_a_storage_url_whose_bucket_boto3_refuses_stops_the_settings(url: str) -> None:
    # Accepted, it would pass /healthz and fail every upload and download with boto3's ParamValidationError.
    with pytest.raises(ValidationError, match="storage_url"):
        Settings(storage_url=url)


def test_an_unreadable_model_list_from_vllm_is_a_503(tmp_path: Path) -> None:
    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == CHAT:  # the LoRA is unknown: the engine checks the base model, then loads it
            return httpx.Response(404, json={"error": {"message": "The model does not exist."}})
        assert request.url.path == MODELS
        return httpx.Response(502, text="<html>Bad Gateway</html>")  # a proxy in front of vLLM

    async def ask() -> None:
        transport = httpx.MockTransport(vllm)
        async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as client:
            engine = VllmEngine(Settings(data_dir=tmp_path), client, LocalStorage(tmp_path / "storage"))
            body = GenerateBody(
                base_model="tiny-phi3", adapter_id="ftjob-x", messages=[{"role": "user", "content": "hi"}]
            )
            await engine.complete(body)

    with pytest.raises(ServiceUnavailable, match="without its model list"):
        asyncio.run(ask())
