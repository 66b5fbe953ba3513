"""The API ↔ inference server contract: the /generate body and what comes back, defined once and imported by
both sides (`app.chat`, `worker.serving.server`), so a field renamed here is renamed for both processes.

A non-streamed reply is a `GenerateResult`. A streamed one is server-sent events: `{DELTA: text}` items, then
one `GenerateFinish`, or an OpenAI-shaped `{"error": ...}` if generation failed midway.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.limits import (
    MAX_CHAT_SEED,
    MAX_COMPLETION_TOKENS,
    MAX_MESSAGES,
    MAX_STOP_SEQUENCES,
    MIN_CHAT_SEED,
    ChatModelId,
    Content,
    ModelId,
    StopSequence,
)

DELTA = "delta"  # the key of a stream item that carries text


class GenerateMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Content


class GenerateBody(BaseModel):
    # The chat request's bounds (app.limits) again: the inference server validates what it is sent too.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: ModelId
    adapter_id: ChatModelId | None = None
    messages: list[GenerateMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_COMPLETION_TOKENS, description="Default: the rest of the context."
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[StopSequence] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=MIN_CHAT_SEED, le=MAX_CHAT_SEED)
    stream: bool = False
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence tokens (benchmarks).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: str | list[str] | None) -> list[str] | None:
        return [stop] if isinstance(stop, str) else stop


class GenerateFinish(BaseModel):
    """How a generation ended: the last item of a stream."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int  # every generated token, the end-of-sequence token included


class GenerateResult(GenerateFinish):
    """A whole, non-streamed generation."""

    text: str
