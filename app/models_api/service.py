"""Resolve model ids to (base model, adapter) for a tenant; list and delete fine-tuned models."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Forbidden, NotFound
from app.exports.cleanup import delete_of_job as delete_exports_of
from app.jobs.artifacts import checkpoint_scope
from app.models import Artifact, Checkpoint, Job
from app.models.base import now
from app.models_api.schemas import Model
from app.repositories import artifacts as stored
from app.repositories import jobs

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


@dataclass(frozen=True)
class FineTuned:
    """A callable fine-tuned model or checkpoint of a tenant: the job that trained it, and the checkpoint."""

    job: Job
    checkpoint: Checkpoint | None

    @property
    def adapter_id(self) -> str:
        """The id its adapter is served by (`app.internal.service.servable_artifact`)."""
        return self.checkpoint.id if self.checkpoint else self.job.id

    @property
    def scope(self) -> str:
        """The scope its adapter archives are stored under."""
        return checkpoint_scope(self.checkpoint.step_number) if self.checkpoint else Artifact.FINAL


def find_fine_tuned(session: Session, tenant_id: str, model_id: str) -> FineTuned | None:
    """The tenant's fine-tuned model (or checkpoint) called `model_id`; None when there is none, it is
    another tenant's, or its model was deleted."""
    job = jobs.fine_tuned(session, tenant_id, model_id)
    if job is not None:
        return FineTuned(job, None)
    found = stored.checkpoint_named(session, tenant_id, model_id)
    if found is None or found[1].model_deleted_at:
        return None
    return FineTuned(found[1], found[0])


def resolve_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> ResolvedModel:
    """A base model id serves the base model; a fine-tuned id (or a checkpoint's) its adapter; else 404."""
    if model_id in settings.resolved_base_models:
        return ResolvedModel(model_id, model_id, None)
    found = find_fine_tuned(session, tenant_id, model_id)
    if found is None:
        raise model_not_found(model_id)
    return ResolvedModel(model_id, found.job.model, found.adapter_id)


def base_model(model_id: str) -> Model:
    return Model(id=model_id, object="model", created=SERVER_START, owned_by="phitune")


def fine_tuned_model(job: Job) -> Model:
    assert job.fine_tuned_model is not None and job.finished_at is not None  # a succeeded job's
    return Model(
        id=job.fine_tuned_model,
        object="model",
        created=job.finished_at,
        owned_by=job.tenant_id,
        parent=job.model,
        fine_tuning_job=job.id,
    )


def list_models(session: Session, settings: Settings, tenant_id: str) -> list[Model]:
    base = [base_model(model_id) for model_id in settings.resolved_base_models]
    return base + [fine_tuned_model(job) for job in jobs.fine_tuned_models(session, tenant_id)]


def get_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> Model:
    if model_id in settings.resolved_base_models:
        return base_model(model_id)
    job = jobs.fine_tuned(session, tenant_id, model_id)
    if job is None:
        raise model_not_found(model_id)
    return fine_tuned_model(job)


def delete_model(session: Session, settings: Settings, tenant_id: str, model_id: str) -> Job:
    """Delete a fine-tuned model: it leaves the list and can no longer be called. Base models stay."""
    if model_id in settings.resolved_base_models:
        raise Forbidden(
            f"'{model_id}' is a base model; only fine-tuned models can be deleted",
            param="model",
            code="model_not_deletable",
        )
    job = jobs.fine_tuned(session, tenant_id, model_id)
    if job is None:
        raise model_not_found(model_id)
    job.model_deleted_at = now()
    delete_exports_of(session, settings, job.id)  # a merged copy of a deleted model goes with it
    return job
