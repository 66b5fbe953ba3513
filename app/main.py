"""create_app(): the FastAPI application with its routers, error handlers and housekeeping loop."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, Literal

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.admin.routes import router as admin_router
from app.auth import KeyCache
from app.body_limit import BodyLimit
from app.chat.routes import router as chat_router
from app.chat.schemas import ChatCompletionChunk
from app.config import Settings, get_settings
from app.db import check_database, close_reads
from app.deps import check_credentials
from app.errors import install_error_handlers
from app.exports.internal import router as internal_exports_router
from app.exports.routes import router as exports_router
from app.files.routes import router as files_router
from app.internal.listener import ListenerSplit
from app.internal.routes import adapters_router as internal_adapters_router
from app.internal.routes import router as internal_router
from app.jobs.event_stream import EventHub, StreamSlots
from app.jobs.housekeeping import Housekeeping
from app.jobs.outbox import JobMessages
from app.jobs.routes import router as jobs_router
from app.metrics import install_metrics
from app.models_api.routes import router as models_router
from app.rate_limit import RateLimiter
from app.request_id import RequestId
from app.service_auth import bearer
from app.storage import open_storage
from app.ui.routes import router as ui_router
from app.webhooks.routes import router as webhooks_router
from app.webhooks.sender import WebhookSender

# Objects only streamed (as server-sent events), which no route's response_model brings into the schema.
STREAMED_SCHEMAS: tuple[type[BaseModel], ...] = (ChatCompletionChunk,)


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]


class NotReady(BaseModel):
    status: Literal["unavailable"]
    failures: dict[str, str]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    messages = JobMessages(settings)
    housekeeping = Housekeeping(settings, messages)
    webhook_sender = WebhookSender(settings)
    events = EventHub(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        housekeeping.start()
        webhook_sender.start()
        app.state.inference = httpx.AsyncClient(
            base_url=settings.inference_url,
            timeout=settings.inference_timeout_seconds,
            headers=bearer(settings.resolved_inference_token),
        )
        try:
            yield
        finally:
            await events.aclose()
            await app.state.inference.aclose()
            await close_reads()
            housekeeping.stop()
            webhook_sender.stop()

    app = FastAPI(
        title="phitune",
        version="0.1.0",
        summary="LoRA fine-tuning of Phi-3 and other causal LMs behind an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = KeyCache(settings.api_key_cache_seconds)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.stream_slots = StreamSlots(settings.max_event_streams_per_tenant)
    app.state.storage = storage = open_storage(settings)
    app.state.messages = messages
    app.state.events = events
    app.state.drain = events.drain  # SIGTERM (phitune.asgi_server): live streams end before the grace does
    install_error_handlers(app, check_credentials)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_body_bytes)
    install_metrics(app, settings)
    if settings.internal_port is not None:
        app.add_middleware(ListenerSplit, internal_port=settings.internal_port)
    # Outermost: every answer, a 404 or 413 of the middlewares too, has its id (and its access line).
    app.add_middleware(RequestId, access_log=settings.access_log)
    # Jobs first: routes are matched in order, and GET /v1/fine_tuning/jobs/{id} is what pollers repeat
    # (matching the files routes before it cost ~19 µs of its ~200 in the app).
    app.include_router(jobs_router, prefix="/v1")
    app.include_router(files_router, prefix="/v1")
    app.include_router(exports_router, prefix="/v1")
    app.include_router(models_router, prefix="/v1")
    app.include_router(chat_router, prefix="/v1")
    app.include_router(admin_router, prefix="/v1")
    app.include_router(webhooks_router, prefix="/v1")
    app.include_router(internal_router, prefix="/internal/v1", include_in_schema=False)
    app.include_router(internal_adapters_router, prefix="/internal/v1", include_in_schema=False)
    app.include_router(internal_exports_router, prefix="/internal/v1", include_in_schema=False)
    app.include_router(ui_router)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Ready,
        tags=["health"],
        responses={503: {"model": NotReady, "description": "Not ready: the failing checks, each with why"}},
    )
    def readyz() -> JSONResponse:
        """200 when the database, the broker and storage all answer; 503 naming the ones that do not."""
        checks = {
            "database": lambda: check_database(settings.resolved_database_url),
            "broker": messages.check_broker,
            "storage": storage.check,
        }
        failures = {}
        for name, check in checks.items():
            try:
                check()
            except Exception as exc:  # any failure means not ready; say which and why
                failures[name] = f"{type(exc).__name__}: {exc}"
        if failures:
            return JSONResponse({"status": "unavailable", "failures": failures}, status_code=503)
        return JSONResponse({"status": "ready"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _, streamed = models_json_schema(
                [(model, "serialization") for model in STREAMED_SCHEMAS],
                ref_template="#/components/schemas/{model}",
            )
            for name, definition in streamed.get("$defs", {}).items():
                schema["components"]["schemas"].setdefault(name, definition)
            _drop_fastapi_validation_errors(schema)
            return schema  # the dict FastAPI.openapi keeps as app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _drop_fastapi_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI documents a 422 HTTPValidationError wherever a route has parameters, but invalid requests
    are answered with a 400 ErrorResponse (app.errors.validation_error): drop what is never sent."""
    fastapi_error = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in schema["paths"].values():
        for operation in operations.values():
            unprocessable = operation["responses"].get("422", {})
            if unprocessable.get("content", {}).get("application/json", {}).get("schema") == fastapi_error:
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
