"""The Celery app workers run: the API's broker settings plus the training task."""

from __future__ import annotations

from celery.signals import worker_shutting_down

from app.broker import TRAIN_TASK, make_celery
from app.config import get_settings
from worker import shutdown
from worker.tasks import run_training_job

celery_app = make_celery(get_settings())


@worker_shutting_down.connect
def _request_hand_back(**_kwargs) -> None:
    """SIGTERM / SIGINT: Celery's warm shutdown waits for the running task, which saves its state and hands
    the job back at its next step instead of training on until the end."""
    shutdown.requested.set()


@celery_app.task(name=TRAIN_TASK, ignore_result=True)
def train_job(job_id: str) -> str:
    """One task per job, carrying only the job id."""
    return run_training_job(job_id, get_settings())
