"""What every inference engine answers the chat route (`app.chat.routes`): a whole completion, or a stream of
text pieces that ends with a `GenerateFinish` (usage included) or a `StreamFailed`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from app.config import Settings
from app.errors import ServiceUnavailable
from app.inference_contract import GenerateBody, GenerateFinish, GenerateResult
from app.log_setup import REQUEST_ID_HEADER, request_id


@dataclass(frozen=True)
class StreamFailed:
    """Generation failed after the stream began: the OpenAI-shaped `{"error": ...}` to pass on."""

    body: dict[str, Any]


# Text (what arrived together, joined), then one GenerateFinish or StreamFailed.
StreamItem = str | GenerateFinish | StreamFailed


class CompletionStream:
    """A streamed generation's items; `aclose` ends the upstream request (cancelling the generation) even
    when the items were never read."""

    def __init__(self, items: AsyncGenerator[StreamItem, None], upstream: httpx.Response) -> None:
        self._items = items
        self._upstream = upstream

    def __aiter__(self) -> AsyncGenerator[StreamItem, None]:
        return self._items

    async def aclose(self) -> None:
        await self._items.aclose()
        await self._upstream.aclose()


class InferenceEngine(ABC):
    """Chat completions for a resolved (base model, adapter id); the engine loads the adapter on first use.

    Errors before any output are `APIError`s in OpenAI's shape: 4xx the client's (e.g. 400
    context_length_exceeded), 503 the deployment's."""

    @abstractmethod
    async def complete(self, generation: GenerateBody) -> GenerateResult: ...

    @abstractmethod
    async def open_stream(self, generation: GenerateBody) -> CompletionStream:
        """Start a streamed generation; errors before the first token raise here, keeping their status."""

    @classmethod
    @abstractmethod
    def unload(cls, settings: Settings, adapter_id: str) -> None:
        """Drop an adapter whose model was deleted (blocking; called after the delete commits)."""


def traced() -> dict[str, str]:
    """The request's id, so that the engine's log lines of this completion carry it too."""
    current = request_id.get()
    return {REQUEST_ID_HEADER: current} if current else {}


def unreachable(exc: httpx.HTTPError) -> ServiceUnavailable:
    return ServiceUnavailable(f"The inference server is unreachable: {exc}")


def unauthorized() -> ServiceUnavailable:
    """A refusal of the API's own credential is the deployment's problem (PHITUNE_INFERENCE_TOKEN differs),
    not an invalid key of the tenant's."""
    return ServiceUnavailable(
        "The inference server refused the API's credentials", code="inference_unauthorized"
    )
