"""The inference HTTP server, which only the API calls: `create_inference_app(settings)` for uvicorn.

Every route but /healthz takes the inference token, which only the API holds (`app.service_auth`): without
it, 401 before the path is routed or the body read. The server itself fetches adapters from the API with
the serving token, which opens nothing but the adapter download.

Every configured base model is loaded at start-up (uvicorn accepts connections once they are all in memory),
each with its own engine, adapter cache and prompt encoder. Nothing heavy runs on the event loop: prompts are
tokenised on threads (`worker.serving.prompts`), adapters loaded on threads, generation runs on the engine's.

    POST   /generate                 chat messages in; the completion as JSON, or as server-sent events
    DELETE /adapters/{adapter_id}    unload an adapter (its model was deleted)
    GET    /stats                    loaded adapters (least recently used first), queue lengths, counters
    GET    /metrics                  Prometheus: tokens generated, time to first token, adapter cache
    GET    /healthz                  the process is alive

Errors are OpenAI-shaped (`app.errors`): 400 context_length_exceeded (param messages or max_tokens), 404
model_not_found (unknown base model, or an adapter the API does not know), 422 invalid_adapter (not plain
LoRA in safetensors, PEFT or loralib, e.g. trained biases), 502 adapter_unavailable (the API could not be
reached for the adapter).
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import APIError, InvalidRequest, NotFound, install_error_handlers
from app.inference_contract import DELTA, GenerateBody, GenerateFinish, GenerateResult
from app.request_id import RequestId
from app.service_auth import RequireSecret
from worker.model_loader import load_base_model
from worker.serving.adapters import (
    AdapterCache,
    AdapterFetcher,
    AdapterFetchFailed,
    AdapterLease,
    AdapterNotFound,
    HttpAdapterFetcher,
)
from worker.serving.engine import (
    ContextLengthExceeded,
    Engine,
    Event,
    Failed,
    Finished,
    Generation,
    GenerationRequest,
    TextDelta,
)
from worker.serving.lora import BASE_SLOT, InvalidAdapter
from worker.serving.metrics import GenerationClock, InferenceMetrics
from worker.serving.prompts import PromptEncoder
from worker.serving.settings import ServingSettings


class UnservableAdapter(APIError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "invalid_adapter"


class AdapterUnavailable(APIError):
    status_code = 502
    error_type = "server_error"
    default_code = "adapter_unavailable"


@dataclass
class ServedModel:
    engine: Engine
    adapters: AdapterCache
    prompts: PromptEncoder

    def close(self) -> None:
        self.prompts.close()
        self.adapters.close()
        self.engine.stop()


def create_inference_app(
    settings: Settings, *, serving: ServingSettings | None = None, fetch: AdapterFetcher | None = None
) -> FastAPI:
    """The inference server. `fetch` downloads adapter archives; by default from the API's internal route."""
    serving = serving or ServingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fetcher, http_fetcher = fetch, None
        if fetcher is None:
            fetcher = http_fetcher = HttpAdapterFetcher(settings.api_url, settings.resolved_serving_token)
        app.state.models = await run_in_threadpool(load_models, settings, serving, fetcher)
        try:
            yield
        finally:
            for served in app.state.models.values():
                await run_in_threadpool(served.close)
            if http_fetcher:
                http_fetcher.close()

    app = FastAPI(title="phitune inference", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        RequireSecret,
        secret=settings.resolved_inference_token,
        what="inference token",
        open_paths={"/healthz", "/metrics"},
    )
    app.add_middleware(RequestId)  # the API sends its request's id: this server's lines carry it too
    metrics = InferenceMetrics(lambda: getattr(app.state, "models", {}))

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request) -> dict:
        models: dict[str, ServedModel] = request.app.state.models
        per_model: dict[str, dict[str, Any]] = {
            model_id: {
                "loaded_adapters": served.adapters.loaded(),
                **served.engine.stats(),
                **served.adapters.counters,
                "memory": device_memory(served.engine.model.device),
            }
            for model_id, served in models.items()
        }
        return {
            "loaded_adapters": [
                adapter for model in per_model.values() for adapter in model["loaded_adapters"]
            ],
            "max_loaded_adapters": settings.max_loaded_adapters,
            "running_sequences": sum(model["running_sequences"] for model in per_model.values()),
            "waiting_sequences": sum(model["waiting_sequences"] for model in per_model.values()),
            "models": per_model,
        }

    @app.delete("/adapters/{adapter_id}")
    async def evict_adapter(adapter_id: str, request: Request) -> dict:
        models: dict[str, ServedModel] = request.app.state.models
        evicted = [served.adapters.evict(adapter_id) for served in models.values()]
        return {"id": adapter_id, "evicted": any(evicted)}

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request):
        served: ServedModel | None = request.app.state.models.get(body.base_model)
        if served is None:
            raise _model_not_found(body.base_model)
        prompt_ids, max_tokens = await _prompt(served, body)
        lease = await _lease(served.adapters, body.adapter_id) if body.adapter_id else None
        events = EventQueue(metrics.generation(body.base_model))
        try:
            generation = served.engine.submit(
                GenerationRequest(
                    prompt_ids=prompt_ids,
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stop or [],
                    seed=body.seed,
                    adapter_slot=lease.slot if lease else BASE_SLOT,
                    ignore_eos=body.ignore_eos,
                ),
                events.put,
            )
        except BaseException:
            if lease:
                lease.release()
            raise
        if body.stream:
            return StreamingResponse(
                _server_sent_events(events, generation, lease),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await _completion(events, generation, lease, request)

    return app


def load_models(
    settings: Settings, serving: ServingSettings, fetch: AdapterFetcher
) -> dict[str, ServedModel]:
    """Load every configured base model and start its engine (the tiny model is generated if needed)."""
    from worker.bootstrap import ensure_tiny_model

    if not torch.cuda.is_available():
        torch.set_num_threads(serving.torch_threads or 1)
    ensure_tiny_model(settings)
    models = {}
    for model_id, path in settings.resolved_base_models.items():
        model, tokenizer = load_base_model(path, for_training=False, device=settings.device)
        engine = Engine(
            model,
            tokenizer,
            max_batch_size=serving.max_batch_size,
            batch_window_seconds=serving.batch_window_ms / 1000,
            max_batch_tokens=serving.max_batch_tokens,
            prefill_chunk_tokens=serving.prefill_chunk_tokens,
            gpu_memory_fraction=serving.gpu_memory_fraction,
        )
        engine.start()
        directory = settings.data_dir / "inference" / "adapters"
        adapters = AdapterCache(
            engine,
            fetch,
            directory,
            capacity=settings.max_loaded_adapters,
            host_bytes=serving.host_adapter_cache_mb * 2**20,
        )
        models[model_id] = ServedModel(engine, adapters, PromptEncoder(tokenizer))
    return models


def device_memory(device: torch.device) -> dict[str, int | str]:
    """What the process holds on `device`: torch's allocator on a GPU (now and at its peak), else the peak
    resident set of the process."""
    if device.type == "cuda":
        return {
            "device": str(device),
            "allocated_bytes": torch.cuda.memory_allocated(device),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
        }
    return {"device": "cpu", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class EventQueue:
    """Carries one generation's events from the engine thread to the request's event loop."""

    def __init__(self, clock: GenerationClock) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._clock = clock

    def put(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self._clock.text()
        elif isinstance(event, Finished):
            self._clock.finished(event.completion_tokens)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The events up to the last one. Text that piled up while the client was slow comes as one delta."""
        while True:
            event: Event | None = await self._queue.get()
            pieces = []
            while isinstance(event, TextDelta):
                pieces.append(event.text)
                event = None if self._queue.empty() else self._queue.get_nowait()
            if pieces:
                yield TextDelta("".join(pieces))
            if event is not None:
                yield event
                return


async def _prompt(served: ServedModel, body: GenerateBody) -> tuple[list[int], int]:
    """The prompt's token ids (chat template, generation prompt added) and the completion's token budget."""
    engine = served.engine
    prompt_ids = await served.prompts.encode([message.model_dump() for message in body.messages])
    max_tokens = body.max_tokens or max(engine.context_length - len(prompt_ids), 1)
    try:
        engine.check_length(len(prompt_ids), max_tokens)
    except ContextLengthExceeded as exc:
        raise InvalidRequest(str(exc), param=exc.param, code="context_length_exceeded") from exc
    return prompt_ids, max_tokens


def _model_not_found(model: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")


async def _lease(adapters: AdapterCache, adapter_id: str) -> AdapterLease:
    try:
        return await asyncio.wrap_future(adapters.acquire(adapter_id))
    except AdapterNotFound as exc:
        raise NotFound(
            f"The model '{adapter_id}' does not exist", param="model", code="model_not_found"
        ) from exc
    except InvalidAdapter as exc:
        raise UnservableAdapter(f"The adapter '{adapter_id}' cannot be served: {exc}", param="model") from exc
    except AdapterFetchFailed as exc:
        raise AdapterUnavailable(str(exc), param="model") from exc


async def _completion(
    events: EventQueue, generation: Generation, lease: AdapterLease | None, request: Request
) -> dict:
    """Wait for the whole completion; a client that hangs up meanwhile cancels it."""
    collected = asyncio.ensure_future(_collect(events))
    hang_up = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([collected, hang_up], return_when=asyncio.FIRST_COMPLETED)
        if not collected.done():
            return {}  # nobody is listening any more
        text, last = collected.result()
        if isinstance(last, Failed):
            raise APIError(last.message, code="generation_failed")
        return GenerateResult(
            text=text,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        ).model_dump()
    finally:
        collected.cancel()
        hang_up.cancel()
        generation.cancel()
        if lease:
            lease.release()


async def _collect(events: EventQueue) -> tuple[str, Finished | Failed]:
    pieces = []
    async for event in events.events():
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            return "".join(pieces), event
    raise AssertionError("a generation always ends with Finished or Failed")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _server_sent_events(
    events: EventQueue, generation: Generation, lease: AdapterLease | None
) -> AsyncIterator[str]:
    """`data: {DELTA}` events, then `data: GenerateFinish`, or `data: {"error"}` if generation failed
    (`app.inference_contract`). Starlette cancels this when the client disconnects."""
    try:
        async for event in events.events():
            if isinstance(event, TextDelta):
                payload = {DELTA: event.text}
            elif isinstance(event, Finished):
                payload = GenerateFinish(
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                ).model_dump()
            else:
                payload = APIError(event.message, code="generation_failed").body()
            yield f"data: {json.dumps(payload)}\n\n"
    finally:
        generation.cancel()  # a no-op once it finished; frees its row when the client went away
        if lease:
            lease.release()
