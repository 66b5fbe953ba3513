"""POST /v1/chat/completions: resolve the model, forward to the inference server, answer as OpenAI."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.chat.schemas import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Usage,
)
from app.config import Settings
from app.db import release_connection
from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.errors import APIError, InvalidRequest, ServiceUnavailable, error_responses
from app.inference_contract import DELTA, GenerateBody, GenerateFinish, GenerateResult
from app.log_setup import REQUEST_ID_HEADER, request_id
from app.models_api.service import resolve_model
from app.openapi_parts import event_stream

router = APIRouter(prefix="/chat", tags=["chat"])

CHUNK_STREAM = {
    "description": "A `chat.completion` object, or with `stream: true` server-sent `chat.completion.chunk` "
    "events ending with `data: [DONE]`.",
    "content": {"text/event-stream": event_stream("ChatCompletionChunk", last_data="[DONE]")},
}


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses={200: CHUNK_STREAM, **error_responses(400, 401, 404, 413, 429, 503)},
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
):
    check_size(body, settings)
    resolved = await run_in_threadpool(resolve_model, session, settings, tenant.id, body.model)
    await run_in_threadpool(release_connection, session)  # hold no connection while the model generates
    inference: httpx.AsyncClient = request.app.state.inference
    generation = body.generation_request(resolved.base_model, resolved.adapter_id)
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if not body.stream:
        result = await _call(inference, generation)
        return _completion(completion_id, created, body.model, result)
    upstream = await _open_stream(inference, generation)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _chunks(upstream, completion_id, created, body.model, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def check_size(body: ChatCompletionRequest, settings: Settings) -> None:
    """The server's own caps, below the schema's (app.limits), before anything else is done: the messages'
    characters together (PHITUNE_MAX_PROMPT_CHARS), so that a prompt no context could hold is never sent to
    the inference server to tokenise, and the completion's tokens (PHITUNE_MAX_COMPLETION_TOKENS)."""
    chars = sum(
        len(m.content) if isinstance(m.content, str) else sum(len(part.text) for part in m.content)
        for m in body.messages
    )
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"The messages hold {chars} characters, more than the {settings.max_prompt_chars} this server "
            "accepts in one request",
            param="messages",
            code="context_length_exceeded",
        )
    if body.token_limit > settings.max_completion_tokens:
        raise InvalidRequest(
            f"max_tokens is {body.token_limit}, more than the {settings.max_completion_tokens} this server "
            "generates in one completion",
            param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            code="invalid_value",
        )


async def _call(inference: httpx.AsyncClient, generation: GenerateBody) -> GenerateResult:
    try:
        response = await inference.post("/generate", json=generation.model_dump(), headers=_traced())
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"The inference server is unreachable: {exc}") from exc
    if response.status_code != 200:
        raise _upstream_error(response.status_code, response.content)
    return GenerateResult.model_validate_json(response.content)


async def _open_stream(inference: httpx.AsyncClient, generation: GenerateBody) -> httpx.Response:
    """Open the upstream stream before answering, so errors (e.g. context too long) keep their status."""
    try:
        upstream = await inference.send(
            inference.build_request("POST", "/generate", json=generation.model_dump(), headers=_traced()),
            stream=True,
        )
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(f"The inference server is unreachable: {exc}") from exc
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        raise _upstream_error(upstream.status_code, content)
    return upstream


def _traced() -> dict[str, str]:
    """The request's id, so that the inference server's log lines of this completion carry it too."""
    current = request_id.get()
    return {REQUEST_ID_HEADER: current} if current else {}


def _upstream_error(status: int, content: bytes) -> APIError:
    """The inference server's OpenAI-shaped error, kept as it is; but a refusal of the API's own credential
    is the deployment's problem (PHITUNE_INFERENCE_TOKEN differs), not an invalid key of the tenant's."""
    if status == 401:
        return ServiceUnavailable(
            "The inference server refused the API's credentials", code="inference_unauthorized"
        )
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


def _usage(result: GenerateFinish) -> dict[str, int]:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(completion_id: str, created: int, model: str, result: GenerateResult) -> JSONResponse:
    completion = ChatCompletion(
        id=completion_id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[
            ChatCompletionChoice(
                index=0,
                message=ChatCompletionMessage(role="assistant", content=result.text, refusal=None),
                finish_reason=result.finish_reason,
                logprobs=None,
            )
        ],
        usage=Usage(**_usage(result)),
    )
    return JSONResponse(completion.model_dump(mode="json"))


async def _chunks(
    upstream: httpx.Response, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Re-emit the inference server's deltas as chat.completion.chunk events, ending with [DONE].

    Deltas that arrived together go out as one chunk, so a slow reader costs fewer writes, not more lag.
    If the client goes away, Starlette cancels this generator and closing `upstream` tells the inference
    server to free the request's slot in its batch.
    """
    chunks = ChunkWriter(completion_id, created, model, include_usage)
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
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
                    yield chunks.content("".join(text))
                    text = []
                if "error" in event:  # generation failed mid-stream: pass the error on, end without [DONE]
                    yield f"data: {json.dumps(event)}\n\n"
                    return
                finish = GenerateFinish.model_validate(event)
                yield chunks.delta({}, finish.finish_reason)
                if include_usage:
                    yield chunks.usage(_usage(finish))
            if text:
                yield chunks.content("".join(text))
        yield "data: [DONE]\n\n"
    finally:
        await upstream.aclose()


class ChunkWriter:
    """Server-sent chat.completion.chunk events of one completion; content chunks, the hot path, are
    formatted from a prepared template rather than serialised whole."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._envelope = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._include_usage = include_usage
        head = json.dumps(self._envelope)[:-1]
        tail = ', "usage": null}' if include_usage else "}"
        self._content_template = (
            head
            + ', "choices": [{"index": 0, "delta": {"content": %s}, "finish_reason": null, "logprobs": null}]'
            + tail
        )

    def content(self, text: str) -> str:
        return f"data: {self._content_template % json.dumps(text)}\n\n"

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return self._event([choice], None)

    def usage(self, usage: dict[str, int]) -> str:
        return self._event([], usage)

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> str:
        body: dict[str, Any] = {**self._envelope, "choices": choices}
        if self._include_usage:  # OpenAI sends usage: null on every chunk but the last when asked for usage
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"
