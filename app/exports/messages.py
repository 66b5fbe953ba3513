"""An export's broker message: the worker's Celery task that makes it, sent with the export's id only."""

from __future__ import annotations

import logging

from celery import Celery

from app import broker

# It goes to its job's training queue (by base model): a worker runs one task at a time, so an export never
# competes with a training job for the same GPU or memory, and runs where the base model is.
EXPORT_TASK = "phitune.export_model"
log = logging.getLogger(__name__)


def send(celery: Celery, export_id: str, model: str) -> None:
    """Queue an export's message; a failure leaves it to be sent again when the export is next read."""
    try:
        broker.send(celery, EXPORT_TASK, export_id, model)
    except Exception:
        log.exception("could not send export %s now; it is sent again when next read", export_id)
