"""/v1/models routes."""

from __future__ import annotations

from fastapi import APIRouter

from app.db import after_commit
from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.errors import error_responses
from app.inference import unload_adapter
from app.models_api import service
from app.models_api.schemas import Model, ModelDeleted, ModelList

router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(401, 429, 503))


@router.get("", response_model=ModelList, response_model_exclude_unset=True)
def list_models(tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> ModelList:
    return ModelList(object="list", data=service.list_models(session, settings, tenant.id))


@router.get(
    "/{model_id:path}",
    response_model=Model,
    response_model_exclude_unset=True,
    responses=error_responses(404),
)
def get_model(model_id: str, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> Model:
    return service.get_model(session, settings, tenant.id, model_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=error_responses(403, 404))
def delete_model(
    model_id: str, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep
) -> ModelDeleted:
    """Delete a fine-tuned model (its job and adapter stay downloadable); it can no longer be called."""
    job = service.delete_model(session, settings, tenant.id, model_id)
    after_commit(session, lambda: unload_adapter(settings, job.id))
    return ModelDeleted(id=model_id, object="model", deleted=True)
