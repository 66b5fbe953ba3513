"""`phitune inference` as the engine: the /generate contract of `app.inference_contract`, whose server
(`worker.serving.server`) fetches an adapter from the API itself on its first request."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import httpx

from app.config import Settings
from app.errors import APIError, ServiceUnavailable
from app.inference.base import (
    CompletionStream,
    InferenceEngine,
    StreamFailed,
    StreamItem,
    traced,
    unauthorized,
    unreachable,
)
from app.inference_contract import DELTA, GenerateBody, GenerateFinish, GenerateResult
from app.service_auth import bearer


class PhituneEngine(InferenceEngine):
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def complete(self, generation: GenerateBody) -> GenerateResult:
        try:
            response = await self._client.post("/generate", json=generation.model_dump(), headers=traced())
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if response.status_code != 200:
            raise upstream_error(response.status_code, response.content)
        return GenerateResult.model_validate_json(response.content)

    async def open_stream(self, generation: GenerateBody) -> CompletionStream:
        request = self._client.build_request(
            "POST", "/generate", json=generation.model_dump(), headers=traced()
        )
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            raise upstream_error(upstream.status_code, content)
        return CompletionStream(_items(upstream), upstream)

    @classmethod
    def unload(cls, settings: Settings, adapter_id: str) -> None:
        httpx.delete(
            f"{settings.inference_url}/adapters/{adapter_id}",
            headers=bearer(settings.resolved_inference_token),
            timeout=5,
        ).raise_for_status()


async def _items(upstream: httpx.Response) -> AsyncGenerator[StreamItem, None]:
    """The server's `data:` events as stream items; deltas that arrived together come as one piece of text,
    so a slow reader costs fewer writes, not more lag."""
    pending = ""
    async for received in upstream.aiter_text():
        *lines, pending = (pending + received).split("\n")
        text = []
        for line in lines:
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if DELTA in event:
                text.append(event[DELTA])
                continue
            if text:
                yield "".join(text)
                text = []
            yield StreamFailed(event) if "error" in event else GenerateFinish.model_validate(event)
        if text:
            yield "".join(text)


def upstream_error(status: int, content: bytes) -> APIError:
    """The inference server's OpenAI-shaped error, kept as it is."""
    if status == 401:
        return unauthorized()
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return ServiceUnavailable(f"The inference server failed with status {status}")
    result = APIError(
        error.get("message", "inference failed"), param=error.get("param"), code=error.get("code")
    )
    result.status_code = status
    result.error_type = error.get("type", "invalid_request_error")
    return result
