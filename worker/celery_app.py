"""The Celery app workers run: the API's broker settings plus the training task."""

from __future__ import annotations

from app.broker import TRAIN_TASK, make_celery
from app.config import get_settings
from worker.tasks import run_training_job

celery_app = make_celery(get_settings())


@celery_app.task(name=TRAIN_TASK, ignore_result=True)
def train_job(job_id: str) -> str:
    """One task per job, carrying only the job id."""
    return run_training_job(job_id, get_settings())
