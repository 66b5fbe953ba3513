"""A stand-in for vLLM's OpenAI server started with --enable-lora, --api-key and runtime LoRA updating:
exactly the routes and shapes the API uses (vllm/entrypoints/openai: chat completions with SSE chunks and
a usage-only last chunk, /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/models), over real HTTP.

Its "model" answers `<model name> says <last user message>`, one word a token, so a test can see which
LoRA a request reached. It reads a LoRA's directory on load, as vLLM does, and forgets every LoRA on
`restart()`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

CONTEXT_TOKENS = 1000


@dataclass
class VllmStub:
    base_model: str
    api_key: str
    loras: dict[str, Path] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)  # every load request's body
    unloads: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)  # the model of every chat request
    fail_midway: bool = False  # streams end with vLLM's error event after the first word

    def restart(self) -> None:
        self.loras.clear()

    def reply(self, model: str, messages: list[dict[str, str]]) -> list[str]:
        return f"{model} says {messages[-1]['content']}".split()


def error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}, status_code=status
    )


def vllm_stub_app(stub: VllmStub) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if (
            request.url.path.startswith("/v1")
            and request.headers.get("authorization") != f"Bearer {stub.api_key}"
        ):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)  # as vLLM's --api-key answers
        return await call_next(request)

    @app.get("/v1/models")
    def models() -> dict:
        cards = [{"id": stub.base_model, "object": "model", "root": stub.base_model, "parent": None}]
        cards += [
            {"id": name, "object": "model", "root": str(path), "parent": stub.base_model}
            for name, path in stub.loras.items()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        stub.loads.append(body)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in stub.loras:
            return error(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        config = Path(path) / "adapter_config.json"
        if not config.is_file() or not (Path(path) / "adapter_model.safetensors").is_file():
            return error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        json.loads(config.read_text())  # vLLM parses it too
        stub.loras[name] = Path(path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        name = (await request.json()).get("lora_name")
        stub.unloads.append(name)
        if name not in stub.loras:
            return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del stub.loras[name]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model = body["model"]
        stub.asked.append(model)
        if model != stub.base_model and model not in stub.loras:
            return error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        messages = body["messages"]
        prompt_tokens = sum(len(m["content"].split()) + 3 for m in messages)
        max_tokens = body.get("max_tokens") or CONTEXT_TOKENS - prompt_tokens
        if prompt_tokens + max_tokens > CONTEXT_TOKENS:
            return error(
                400,
                f"This model's maximum context length is {CONTEXT_TOKENS} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens.",
                "BadRequestError",
            )
        words = stub.reply(model, messages)
        finish = "stop" if len(words) < max_tokens else "length"
        words = words[:max_tokens]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words) + (finish == "stop"),  # the end-of-sequence token counts
            "total_tokens": 0,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        envelope = {"id": "chatcmpl-stub", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            return {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        return StreamingResponse(_events(stub, envelope, words, finish, usage if include_usage else None))

    return app


def _events(stub: VllmStub, envelope: dict, words: list[str], finish: str, usage: dict | None):
    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**envelope, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for i, word in enumerate(words):
        yield chunk({"content": word if i == 0 else f" {word}"})
        if stub.fail_midway:
            failure = {"message": "engine dead", "type": "InternalServerError", "param": None, "code": 500}
            yield f"data: {json.dumps({'error': failure})}\n\n"
            yield "data: [DONE]\n\n"
            return
    yield chunk({"content": ""}, finish)
    if usage:
        body = {**envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
