"""The Celery app as the API sees it: a producer of training messages (no task code, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from app.config import Settings
from app.log_setup import TASK_REQUEST_ID, request_id

TRAINING_QUEUE = "training"
TRAIN_TASK = "phitune.train_job"
# The base model of a message's job, in a header: the router picks its queue by it, and a worker that does
# not have the model leaves the message alone (worker.celery_app).
MODEL_HEADER = "phitune_model"
# Redis re-delivers a message not acknowledged within this long to another worker. Messages are acknowledged
# when their task ends, so it must outlast the longest attempt; see visibility_timeout().
VISIBILITY_MARGIN_SECONDS = 3600


@dataclass(frozen=True)
class QueueRoutes:
    """The queue of a job's messages (training and export): its base model's in PHITUNE_TRAINING_QUEUES,
    else `training`. The Celery app's router (make_celery), so every message is routed by this one rule."""

    by_model: Mapping[str, str]

    def queue(self, model: str | None) -> str:
        return self.by_model.get(model, TRAINING_QUEUE) if model is not None else TRAINING_QUEUE

    @property
    def queues(self) -> list[str]:
        """Every queue a message may be sent to."""
        return sorted({TRAINING_QUEUE, *self.by_model.values()})

    def __call__(self, name: str, args: Any, kwargs: Any, options: dict, task: Any = None, **_: Any) -> dict:
        """Celery's router interface: the queue of the model the message's headers name."""
        return {"queue": self.queue((options.get("headers") or {}).get(MODEL_HEADER))}


def queue_routes(celery: Celery) -> QueueRoutes:
    """The routes `celery` (made by make_celery) sends messages by."""
    routes: QueueRoutes = celery.conf.task_routes[0]
    return routes


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker: the embedded filesystem transport by default, or Redis."""
    url = settings.resolved_broker_url
    celery = Celery("phitune", broker=url, set_as_current=False)
    options: dict[str, object] = {}
    if url.startswith("filesystem://"):
        queue_dir, control_dir = settings.broker_dir / "queue", settings.broker_dir / "control"
        queue_dir.mkdir(parents=True, exist_ok=True)
        control_dir.mkdir(parents=True, exist_ok=True)
        options = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
        }
    elif url.startswith(("redis://", "rediss://")):
        options = {"visibility_timeout": visibility_timeout(settings)}
        if settings.broker_key_prefix:
            options["global_keyprefix"] = settings.broker_key_prefix
    celery.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=TRAINING_QUEUE,
        task_routes=(QueueRoutes(settings.training_queues),),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledged when the task ends, not when it starts: a worker that dies between taking a message
        # and claiming its job leaves the message to be delivered again (a job the API has already
        # re-queued by its lease is claimed once; the other copy is refused by the claim and dropped).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One training job at a time per worker. With late acknowledgement, the running job's message is
        # the one unacknowledged message a worker may hold, so no job waits behind a running one.
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # The embedded transport has no broadcast worth paying for; Redis keeps `celery inspect` working.
        worker_enable_remote_control=not url.startswith("filesystem://"),
    )
    return celery


def visibility_timeout(settings: Settings) -> int:
    """Longer than any attempt may run (max_job_seconds), so a running job's message is never handed to a
    second worker while the first is alive."""
    return int(settings.max_job_seconds) + VISIBILITY_MARGIN_SECONDS


def enqueue_training(celery: Celery, job_id: str, model: str) -> None:
    """Send the one message a job needs: its id. Everything else the worker fetches through the API."""
    send(celery, TRAIN_TASK, job_id, model)


def send(celery: Celery, task: str, object_id: str, model: str) -> None:
    """Send `task` with its one argument, a job's or an export's id, to the queue of its base `model`. The
    model and the id of the request that caused it (none when the housekeeping loop resends it) ride in
    headers, which workers of earlier versions ignore."""
    celery.send_task(task, args=[object_id], headers={TASK_REQUEST_ID: request_id.get(), MODEL_HEADER: model})
