"""The Celery app workers run: the API's broker settings plus the training task."""

from __future__ import annotations

import logging
import os

import celery.apps.worker
from celery.signals import setup_logging, task_postrun, task_prerun, worker_init, worker_shutting_down

from app import log_setup
from app.broker import MODEL_HEADER, TRAIN_TASK, make_celery
from app.config import get_settings
from app.exports.messages import EXPORT_TASK
from worker import metrics, shutdown
from worker.export import run_export
from worker.tasks import run_training_job

celery_app = make_celery(get_settings())
log = logging.getLogger(__name__)


@setup_logging.connect
def _configure_logging(**_kwargs) -> None:
    """Celery leaves the process's logging to this receiver: phitune's format (PHITUNE_LOG_FORMAT)."""
    settings = get_settings()
    log_setup.configure("worker", settings.log_format, settings.log_level)
    if settings.log_format == "json":
        # What libraries print (the trainer's PrinterCallback, a thread's traceback) becomes log lines, and
        # Celery's signal handlers, which print rather than log ("worker: Warm shutdown"), print JSON lines.
        celery_app.log.redirect_stdouts_to_logger(logging.getLogger("worker.output"), loglevel=logging.INFO)
        celery.apps.worker.safe_say = _say_as_json


def _say_as_json(message: str, _file: object = None) -> None:
    os.write(2, (log_setup.json_line("worker", "celery.worker", logging.WARNING, message) + "\n").encode())


@worker_init.connect
def _serve_metrics(**_kwargs) -> None:
    if (port := get_settings().worker_metrics_port) is not None:
        metrics.serve(port)


@task_prerun.connect
def _enter_job(task, args, **_kwargs) -> None:
    """Every line logged while a training task runs names its job and the request that queued it."""
    log_setup.request_id.set(task.request.get(log_setup.TASK_REQUEST_ID))
    if task.name == TRAIN_TASK and args:
        log_setup.job_id.set(args[0])


@task_postrun.connect
def _leave_job(**_kwargs) -> None:
    for variable in log_setup.CONTEXT.values():
        variable.set(None)


@worker_shutting_down.connect
def _request_hand_back(**_kwargs) -> None:
    """SIGTERM / SIGINT: Celery's warm shutdown waits for the running task, which saves its state and hands
    the job back at its next step instead of training on until the end."""
    shutdown.requested.set()


# A task's outcome when its message names a base model this worker does not have.
MODEL_MISSING = "model_missing"


def lacks_base_model(task, object_id: str) -> bool:
    """Whether the message names a base model this worker does not have (PHITUNE_BASE_MODELS). Such a
    message is dropped unclaimed rather than fail its job here: the job stays queued, and the API sends it
    again once its queue is empty (PHITUNE_REDELIVER_SECONDS), for a worker that has the model to take."""
    model = task.request.get(MODEL_HEADER)
    if model is None or model in get_settings().resolved_base_models:
        return False
    log.warning(
        "%s is on base model %s, which this worker does not have (PHITUNE_BASE_MODELS); left queued for a "
        "worker that has it: route the model to a queue only such workers take (PHITUNE_TRAINING_QUEUES)",
        object_id,
        model,
    )
    return True


@celery_app.task(name=TRAIN_TASK, ignore_result=True, bind=True)
def train_job(self, job_id: str) -> str:
    """One task per job, carrying only the job id."""
    if lacks_base_model(self, job_id):
        metrics.ATTEMPTS.labels(MODEL_MISSING).inc()
        return MODEL_MISSING
    return run_training_job(job_id, get_settings())


@celery_app.task(name=EXPORT_TASK, ignore_result=True, bind=True)
def export_model(self, export_id: str) -> str:
    """One task per merged-model export, carrying only the export id."""
    if lacks_base_model(self, export_id):
        return MODEL_MISSING
    return run_export(export_id, get_settings())
