"""POST /v1/chat/completions: resolve the model, ask the inference engine (app.inference), answer."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

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
from app.errors import InvalidRequest, error_responses
from app.inference import CompletionStream, StreamFailed, engine_of
from app.inference_contract import GenerateFinish, GenerateResult
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
    engine = engine_of(request.app)
    generation = body.generation_request(resolved.base_model, resolved.adapter_id)
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if not body.stream:
        result = await engine.complete(generation)
        return _completion(completion_id, created, body.model, result)
    upstream = await engine.open_stream(generation)
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
    upstream: CompletionStream,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Re-emit the engine's stream as chat.completion.chunk events, ending with [DONE].

    If the client goes away, Starlette cancels this generator and closing `upstream` tells the engine to
    stop the generation.
    """
    chunks = ChunkWriter(completion_id, created, model, include_usage)
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        async for item in upstream:
            if isinstance(item, str):
                yield chunks.content(item)
            elif isinstance(item, StreamFailed):  # generation failed mid-stream: pass it on, without [DONE]
                yield f"data: {json.dumps(item.body)}\n\n"
                return
            else:
                yield chunks.delta({}, item.finish_reason)
                if include_usage:
                    yield chunks.usage(_usage(item))
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
