"""/v1/models routes."""

from __future__ import annotations

import logging

import httpx
from fastapi import APIRouter

from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.models_api import service

router = APIRouter(prefix="/models", tags=["models"])
log = logging.getLogger(__name__)


@router.get("")
def list_models(tenant: CurrentTenant, session: SessionDep, settings: SettingsDep):
    return {"object": "list", "data": service.list_models(session, settings, tenant.id)}


@router.get("/{model_id:path}")
def get_model(model_id: str, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep):
    return service.get_model(session, settings, tenant.id, model_id)


@router.delete("/{model_id:path}")
def delete_model(model_id: str, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep):
    """Delete a fine-tuned model (its job and adapter stay downloadable); it can no longer be called."""
    job = service.delete_model(session, settings, tenant.id, model_id)
    session.commit()
    try:  # free its memory now; a failure here only delays that until LRU eviction
        httpx.delete(f"{settings.inference_url}/adapters/{job.id}", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        log.warning("could not evict adapter %s from the inference server: %s", job.id, exc)
    return {"id": model_id, "object": "model", "deleted": True}
