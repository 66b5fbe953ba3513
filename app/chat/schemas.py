"""The OpenAI chat completion request, validated before anything reaches the inference server: every number
finite and bounded, every string valid Unicode and capped (`app.limits`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.inference_contract import GenerateBody
from app.limits import (
    MAX_CHAT_SEED,
    MAX_COMPLETION_TOKENS,
    MAX_CONTENT_CHARS,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MIN_CHAT_SEED,
    ChatModelId,
    Name,
    declared,
    valid_unicode,
)

DEFAULT_MAX_TOKENS = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[str, declared(maxLength=MAX_CONTENT_CHARS)]  # checked with its message's whole content


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's newer "developer" role is its system role; Phi-3's template knows system/user/assistant.
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, declared(maxLength=MAX_CONTENT_CHARS)]
        | Annotated[list[TextPart], declared(maxItems=MAX_CONTENT_PARTS)]
    )
    name: Name | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        texts = [content] if isinstance(content, str) else [part.text for part in content]
        if len(texts) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} text parts")
        if sum(map(len, texts)) > MAX_CONTENT_CHARS:
            raise ValueError(f"at most {MAX_CONTENT_CHARS} characters")
        for text in texts:
            valid_unicode(text)
        return content

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Fields the engine honours; OpenAI fields it cannot honour are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ChatModelId
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(gt=0, le=MAX_COMPLETION_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(gt=0, le=MAX_COMPLETION_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: (
        Annotated[str, declared(minLength=1, maxLength=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, declared(minLength=1, maxLength=MAX_STOP_CHARS)]],
            declared(maxItems=MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None
    seed: Annotated[int, Field(ge=MIN_CHAT_SEED, le=MAX_CHAT_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: Name | None = None
    # vLLM's extension of the OpenAI request, kept under its name: generate past end-of-sequence (benchmarks).
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        for s in stops:
            valid_unicode(s)
        return stops

    @model_validator(mode="after")
    def _check_lengths(self) -> ChatCompletionRequest:
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one of them")
        return self

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def generation_request(self, base_model: str, adapter_id: str | None) -> GenerateBody:
        """The inference server's /generate body."""
        return GenerateBody(
            base_model=base_model,
            adapter_id=adapter_id,
            messages=[message.as_template_message() for message in self.messages],
            max_tokens=self.token_limit,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=self.seed,
            stream=self.stream,
            ignore_eos=self.ignore_eos,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: str = Field(
        description="stop, length (the token limit) ...: as the inference server says."
    )
    logprobs: None


class ChatCompletion(BaseModel):
    """The OpenAI chat.completion object answered when `stream` is false."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletionDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="In the first chunk only.")
    content: str | None = Field(None, description="Absent from the final chunk, which has a finish_reason.")


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChatCompletionDelta
    finish_reason: str | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (`stream: true`), which ends with `data: [DONE]`. Chunks
    carry `usage` (null but on the last, usage-only chunk, whose `choices` is empty) only when
    `stream_options.include_usage` is true."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
