"""The export request body and the objects the exports API answers with."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models.tables import Export
from app.pagination import ListPage

# What an export makes: "merged" is the base model with the adapter folded into its weights.
ExportFormat = Literal["merged"]
ExportStatus = Literal["queued", "running", "succeeded", "failed"]


class ExportCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs/{id}/exports`."""

    model_config = ConfigDict(extra="forbid")
    format: ExportFormat = "merged"


class ExportError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobExport(BaseModel):
    """A merged-model export of a fine-tuning job. Its content is a tar of a Hugging Face model directory
    (safetensors shards, config, tokenizer with its chat template) once `status` is `succeeded`."""

    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    job_id: str
    format: ExportFormat
    status: ExportStatus
    bytes: int | None = Field(description="The size of the tar, once succeeded.")
    error: ExportError | None
    created_at: int
    finished_at: int | None

    @classmethod
    def from_row(cls, export: Export) -> JobExport:
        error: dict[str, Any] | None = export.error
        return cls(
            id=export.id,
            job_id=export.job_id,
            format=export.format,
            status=export.status,
            bytes=export.bytes,
            error=ExportError(**error) if error else None,
            created_at=export.created_at,
            finished_at=export.finished_at,
        )


class JobExportList(ListPage[JobExport]):
    pass
