"""The OpenAI model objects the models API answers with (rendered by app.models_api.service)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Model(BaseModel):
    """A base model (owned by `phitune`) or one of the tenant's fine-tuned models. `parent` and
    `fine_tuning_job` are present on fine-tuned models only; routes answer with exclude_unset so a base
    model's object has no such keys."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="Fine-tuned models only: the base model.")
    fine_tuning_job: str | None = Field(None, description="Fine-tuned models only: the job that made it.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: bool
