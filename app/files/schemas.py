"""The OpenAI-shaped file objects the files API answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.models import File
from app.pagination import ListPage


class FileStats(BaseModel):
    """What validation counted; `messages` and `assistant_turns` are null unless the format is chat."""

    examples: int
    format: Literal["chat", "prompt_completion", "text", "preference"]
    messages: int | None = None
    assistant_turns: int | None = Field(None, description="Assistant messages trained on (weight 1).")
    characters: int = Field(description="Characters of all contents, prompts, completions and texts.")
    max_example_characters: int = Field(description="Characters of the longest example.")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # only valid files are ever stored
    sha256: str
    stats: FileStats | None = Field(description="A dataset's; null for a job's result file.")

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=row.created_at,
            filename=row.filename,
            purpose=row.purpose,
            sha256=row.sha256,
            stats=FileStats.model_validate(row.stats) if row.stats else None,  # a result file's are {}
        )


class FileList(ListPage[FileObject]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class HistogramBin(BaseModel):
    start: int = Field(description="The fewest tokens an example in this bin has.")
    end: int = Field(description="More tokens than any example in this bin has.")
    count: int


class TokenStats(BaseModel):
    """Tokens per example with the base model's tokenizer, as the worker renders it (chat template
    included), before truncation."""

    total: int
    min: int
    median: float
    p95: int
    max: int
    histogram: list[HistogramBin]


class FileReport(BaseModel):
    """A dataset's report for one base model and max_seq_length. The token fields are null when
    `tokens_unavailable` says why they could not be counted."""

    object: Literal["file.report"] = "file.report"
    file_id: str
    model: str
    max_seq_length: int
    train_on_inputs: bool
    examples: int
    duplicate_examples: int = Field(description="Examples identical to an earlier one of the file.")
    empty_assistant_turns: int = Field(description="Assistant messages whose content is empty or blank.")
    tokens: TokenStats | None
    trained_tokens: int | None = Field(
        description="Tokens the loss covers (supervised), within max_seq_length, of the examples kept."
    )
    truncated_examples: int | None = Field(description="Examples longer than max_seq_length, cut to it.")
    truncated_tokens: int | None = Field(description="Tokens past max_seq_length, of all examples.")
    dropped_examples: int | None = Field(
        description="Examples a job leaves out: no trained token left within max_seq_length."
    )
    tokens_unavailable: str | None = Field(description="Why the token fields are null; null when counted.")
