"""A vLLM OpenAI server as the engine: `vllm serve <base> --served-model-name <our base model id>
--enable-lora --api-key $PHITUNE_INFERENCE_TOKEN` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.

A fine-tuned model is asked for by its adapter id (the job's or checkpoint's id) as vLLM's `lora_name`, never
by the tenant's model name, so one tenant's request can only reach the adapter the API resolved for it. vLLM
keeps what it loaded; a 404 for a LoRA it does not know (never loaded, or vLLM restarted) makes the API unpack
the adapter where vLLM reads it (`app.inference.vllm_adapters`), load it (POST /v1/load_lora_adapter) and ask
once more. Usage comes from vLLM's own counts (`stream_options.include_usage` on streams).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any, Literal

import httpx
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import APIError, InvalidRequest, NotFound, ServiceUnavailable
from app.inference import vllm_adapters
from app.inference.base import (
    CompletionStream,
    InferenceEngine,
    StreamFailed,
    StreamItem,
    traced,
    unauthorized,
    unreachable,
)
from app.inference_contract import GenerateBody, GenerateFinish, GenerateResult
from app.service_auth import bearer
from app.storage.base import Storage

CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
MODELS = "/v1/models"
FINISH_REASONS = ("stop", "length")  # ours (app.inference_contract); vLLM may also say abort


class VllmEngine(InferenceEngine):
    def __init__(self, settings: Settings, client: httpx.AsyncClient, storage: Storage) -> None:
        self._settings = settings
        self._client = client
        self._storage = storage

    async def complete(self, generation: GenerateBody) -> GenerateResult:
        response = await self._send(generation)
        try:
            body = json.loads(await response.aread())
        finally:
            await response.aclose()
        choice = body["choices"][0]
        return GenerateResult(
            text=choice["message"]["content"] or "",
            finish_reason=_finish_reason(choice["finish_reason"]),
            **_usage(body["usage"]),
        )

    async def open_stream(self, generation: GenerateBody) -> CompletionStream:
        upstream = await self._send(generation)
        return CompletionStream(_items(upstream), upstream)

    @classmethod
    def unload(cls, settings: Settings, adapter_id: str) -> None:
        # The unpacked files go even when vLLM cannot be told: nothing else would ever remove them.
        vllm_adapters.remove(settings, adapter_id)
        response = httpx.post(
            f"{settings.inference_url}{UNLOAD}",
            json={"lora_name": adapter_id},
            headers=bearer(settings.resolved_inference_token),
            timeout=5,
        )
        if response.status_code not in (200, 404):  # 404: vLLM has not loaded it (or restarted since)
            response.raise_for_status()

    async def _send(self, generation: GenerateBody) -> httpx.Response:
        """vLLM's answer, open for reading; a LoRA it does not know is loaded, then asked for again."""
        response = await self._post(generation)
        if response.status_code == 404 and generation.adapter_id:
            await response.aclose()
            await self._load(generation.base_model, generation.adapter_id)
            response = await self._post(generation)
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            raise _error(generation, response.status_code, content)
        return response

    async def _post(self, generation: GenerateBody) -> httpx.Response:
        request = self._client.build_request("POST", CHAT, json=chat_request(generation), headers=traced())
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc

    async def _load(self, base_model: str, adapter_id: str) -> None:
        await self._check_base_model(base_model, adapter_id)
        path = await run_in_threadpool(vllm_adapters.unpack, self._settings, self._storage, adapter_id)
        body = {"lora_name": adapter_id, "lora_path": str(path)}
        try:
            response = await self._client.post(LOAD, json=body, headers=traced())
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if response.status_code == 200:
            return
        if response.status_code == 401:
            raise unauthorized()
        message = _message(response.content)
        if response.status_code == 400 and "already been loaded" in message:  # a concurrent request loaded it
            return
        raise vllm_adapters.UnservableAdapter(
            f"vLLM could not load the adapter of '{adapter_id}': {message}", param="model"
        )

    async def _check_base_model(self, base_model: str, adapter_id: str) -> None:
        """vLLM puts any LoRA on the one base model it serves: refuse an adapter trained on another."""
        try:
            response = await self._client.get(MODELS, headers=traced())
        except httpx.HTTPError as exc:
            raise unreachable(exc) from exc
        if response.status_code == 401:
            raise unauthorized()
        try:
            served = [card["id"] for card in response.json()["data"] if not card.get("parent")]
        except (ValueError, KeyError, TypeError) as exc:  # a proxy's error page, a 5xx: not the client's
            raise ServiceUnavailable(
                f"vLLM's {MODELS} answered status {response.status_code} without its model list"
            ) from exc
        if base_model not in served:
            raise ServiceUnavailable(
                f"'{adapter_id}' was trained on {base_model}, but vLLM serves "
                f"{', '.join(served) or 'nothing'}",
                param="model",
                code="base_model_not_served",
            )


def chat_request(generation: GenerateBody) -> dict[str, Any]:
    """vLLM's chat completion body for our /generate body (`app.inference_contract`)."""
    body: dict[str, Any] = {
        "model": generation.adapter_id or generation.base_model,
        "messages": [message.model_dump() for message in generation.messages],
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "stream": generation.stream,
    }
    if generation.max_tokens is not None:
        body["max_tokens"] = generation.max_tokens
    if generation.stop:
        body["stop"] = generation.stop
    if generation.seed is not None:
        body["seed"] = generation.seed
    if generation.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension of the OpenAI request
    if generation.stream:
        body["stream_options"] = {"include_usage": True}  # the usage of a stream, on its last chunk
    return body


async def _items(upstream: httpx.Response) -> AsyncGenerator[StreamItem, None]:
    """vLLM's chat.completion.chunk events as stream items: the content of what arrived together as one
    piece of text, then the finish (its usage from the last, usage-only chunk) or vLLM's error."""
    pending, finish_reason = "", None
    async for received in upstream.aiter_text():
        *lines, pending = (pending + received).split("\n")
        text: list[str] = []
        for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                if any(text):
                    yield "".join(text)
                yield StreamFailed(_openai_error(chunk["error"]))
                return
            for choice in chunk.get("choices") or []:
                text.append(choice.get("delta", {}).get("content") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
            if chunk.get("usage") and finish_reason:
                if any(text):
                    yield "".join(text)
                text = []
                if finish_reason not in FINISH_REASONS:
                    yield StreamFailed(
                        _openai_error(f"generation ended with finish_reason {finish_reason!r}")
                    )
                    return
                yield GenerateFinish(finish_reason=_finish_reason(finish_reason), **_usage(chunk["usage"]))
                return
        if any(text):
            yield "".join(text)
    yield StreamFailed(_openai_error("the stream ended without its usage"))


def _finish_reason(reason: str | None) -> Literal["stop", "length"]:
    """vLLM's stop and length are ours; anything else (abort) is a generation that failed."""
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise ServiceUnavailable(f"vLLM ended the generation with finish_reason {reason!r}")


def _usage(usage: dict[str, int]) -> dict[str, int]:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}


def _message(content: bytes) -> str:
    """vLLM's error message: {"error": {...}} (older versions: the error object itself), or the text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500]
    error = body.get("error", body) if isinstance(body, dict) else {}
    return str(error.get("message", body)) if isinstance(error, dict) else str(body)


def _openai_error(error: Any) -> dict[str, Any]:
    """vLLM's error object (or a message) in OpenAI's shape: vLLM's code is the HTTP status, ours a word."""
    message = error.get("message", "generation failed") if isinstance(error, dict) else str(error)
    return APIError(f"vLLM: {message}", code="generation_failed").body()


def _error(generation: GenerateBody, status: int, content: bytes) -> APIError:
    """vLLM's refusal as our API error: 400s stay the client's (the context is the usual one), the rest is
    the deployment's."""
    message = _message(content)
    if status == 401:
        return unauthorized()
    if status == 400:
        too_long = "context length" in message or "maximum context" in message
        return InvalidRequest(
            message,
            param="messages" if too_long else None,
            code="context_length_exceeded" if too_long else "invalid_request",
        )
    if status == 404 and generation.adapter_id:  # still unknown right after loading it
        return NotFound(f"vLLM does not know '{generation.adapter_id}': {message}", param="model")
    if status == 404:
        return ServiceUnavailable(
            f"vLLM does not serve the base model {generation.base_model} (start it with "
            f"--served-model-name {generation.base_model}): {message}",
            code="base_model_not_served",
        )
    return ServiceUnavailable(f"vLLM failed with status {status}: {message}")
