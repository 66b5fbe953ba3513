"""An export's broker message: the worker's Celery task that makes it, sent with the export's id only."""

from __future__ import annotations

import logging

from celery import Celery

from app.broker import TRAINING_QUEUE

# It shares the training queue: a worker runs one task at a time, so an export never competes with a
# training job for the same GPU or memory.
EXPORT_TASK = "phitune.export_model"
log = logging.getLogger(__name__)


def send(celery: Celery, export_id: str) -> None:
    """Queue an export's message; a failure leaves it to be sent again when the export is next read."""
    try:
        celery.send_task(EXPORT_TASK, args=[export_id], queue=TRAINING_QUEUE)
    except Exception:
        log.exception("could not send export %s now; it is sent again when next read", export_id)
