"""Resolve model ids to (base model, adapter) for a tenant; list and delete fine-tuned models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Forbidden, NotFound
from app.jobs import checkpoints
from app.models import Job, JobStatus
from app.models.base import now

SERVER_START = now()


@dataclass(frozen=True)
class ResolvedModel:
    """What the inference server runs for a model id: a base model, and the job whose adapter applies."""

    id: str
    base_model: str
    adapter_id: str | None


def model_not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def fine_tuned_models_query(tenant_id: str):
    return select(Job).where(
        Job.tenant_id == tenant_id,
        Job.status == JobStatus.SUCCEEDED,
        Job.fine_tuned_model.is_not(None),
        Job.model_deleted_at.is_(None),
    )


def fine_tuned_job(session: Session, tenant_id: str, model_id: str) -> Job | None:
    return session.scalar(fine_tuned_models_query(tenant_id).where(Job.fine_tuned_model == model_id))


def resolve_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> ResolvedModel:
    """A base model id serves the base model; a fine-tuned id (or a checkpoint's) its adapter; else 404."""
    if model_id in settings.resolved_base_models:
        return ResolvedModel(model_id, model_id, None)
    job = fine_tuned_job(session, tenant_id, model_id)
    if job is not None:
        return ResolvedModel(model_id, job.model, job.id)
    found = checkpoints.by_model_name(session, tenant_id, model_id)
    if found is None or found[1].model_deleted_at:
        raise model_not_found(model_id)
    checkpoint, job = found
    return ResolvedModel(model_id, job.model, checkpoint.id)


def render_base_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": SERVER_START, "owned_by": "phitune"}


def render_fine_tuned_model(job: Job) -> dict[str, Any]:
    return {
        "id": job.fine_tuned_model,
        "object": "model",
        "created": job.finished_at,
        "owned_by": job.tenant_id,
        "parent": job.model,
        "fine_tuning_job": job.id,
    }


def list_models(session: Session, settings: Settings, tenant_id: str) -> list[dict[str, Any]]:
    base = [render_base_model(model_id) for model_id in settings.resolved_base_models]
    tuned = session.scalars(fine_tuned_models_query(tenant_id).order_by(Job.seq))
    return base + [render_fine_tuned_model(job) for job in tuned]


def get_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> dict[str, Any]:
    if model_id in settings.resolved_base_models:
        return render_base_model(model_id)
    job = fine_tuned_job(session, tenant_id, model_id)
    if job is None:
        raise model_not_found(model_id)
    return render_fine_tuned_model(job)


def delete_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> Job:
    """Delete a fine-tuned model: it leaves the list and can no longer be called. Base models stay."""
    if model_id in settings.resolved_base_models:
        raise Forbidden(
            f"'{model_id}' is a base model; only fine-tuned models can be deleted",
            param="model",
            code="model_not_deletable",
        )
    job = fine_tuned_job(session, tenant_id, model_id)
    if job is None:
        raise model_not_found(model_id)
    job.model_deleted_at = now()
    return job
