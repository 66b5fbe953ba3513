"""A deleted model's exports go with it (DELETE /v1/models/{id}). Apart from app.exports.service, which
needs the job machinery, so that the models API can import it without a cycle."""

from __future__ import annotations

from functools import partial

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit
from app.repositories import exports
from app.storage import open_storage


def delete_of_job(session: Session, settings: Settings, job_id: str) -> None:
    """Forget a job's exports, deleting their archives once the deletion has committed."""
    storage = open_storage(settings)
    for key in exports.delete_of_job(session, job_id):
        after_commit(session, partial(storage.delete, key))
