"""The API's inference backend, behind one interface (`InferenceEngine`) whichever engine serves chat.

    PHITUNE_INFERENCE_ENGINE=phitune   `phitune inference` (app.inference.phitune): the /generate contract
    PHITUNE_INFERENCE_ENGINE=vllm      a vLLM OpenAI server with runtime LoRA loading (app.inference.vllm)

The API resolves the tenant's model to a base model and an adapter id (`app.models_api.service`) before an
engine is asked anything, so tenant routing, 404s and usage are the API's whichever engine runs.
"""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI

from app.config import Settings
from app.inference.base import CompletionStream, InferenceEngine, StreamFailed, StreamItem
from app.inference.phitune import PhituneEngine
from app.inference.vllm import VllmEngine

__all__ = ["CompletionStream", "InferenceEngine", "StreamFailed", "StreamItem", "engine_of", "unload_adapter"]

log = logging.getLogger(__name__)


def engine_of(app: FastAPI) -> InferenceEngine:
    """The configured engine over the app's inference client (`app.state.inference`); cheap, per request:
    what an engine keeps (loaded adapters) lives in the inference server, not here."""
    settings: Settings = app.state.settings
    client: httpx.AsyncClient = app.state.inference
    if settings.inference_engine == "vllm":
        return VllmEngine(settings, client, app.state.storage)
    return PhituneEngine(client)


def unload_adapter(settings: Settings, adapter_id: str) -> None:
    """Free a deleted model's adapter in the engine now; a failure only delays that (LRU eviction)."""
    engine = VllmEngine if settings.inference_engine == "vllm" else PhituneEngine
    try:
        engine.unload(settings, adapter_id)
    except (httpx.HTTPError, OSError) as exc:
        log.warning("could not unload adapter %s from the inference engine: %s", adapter_id, exc)
