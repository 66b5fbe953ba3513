"""The OpenAI-shaped file objects the files API answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.models import File
from app.pagination import ListPage


class FileStats(BaseModel):
    """What validation counted; `messages` and `assistant_turns` are null unless the format is chat."""

    examples: int
    format: Literal["chat", "prompt_completion", "text"]
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
