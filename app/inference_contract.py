"""The API ↔ inference server contract: the /generate body and what comes back, defined once and imported by
both sides (`app.chat`, `worker.serving.server`), so a field renamed here is renamed for both processes.

A non-streamed reply is a `GenerateResult`. A streamed one is server-sent events: `{DELTA: text}` items, then
one `GenerateFinish`, or an OpenAI-shaped `{"error": ...}` if generation failed midway.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
DELTA = "delta"  # the key of a stream item that carries text


class GenerateMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    adapter_id: str | None = None
    messages: list[GenerateMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool = False
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence tokens (benchmarks).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: str | list[str] | None) -> list[str] | None:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop is not None and (len(stop) > MAX_STOP_SEQUENCES or not all(stop)):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, none of them empty")
        return stop


class GenerateFinish(BaseModel):
    """How a generation ended: the last item of a stream."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int  # every generated token, the end-of-sequence token included


class GenerateResult(GenerateFinish):
    """A whole, non-streamed generation."""

    text: str
