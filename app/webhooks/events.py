"""The job events webhooks are sent, and `announce`, which app.jobs.states calls on every status change in
the change's own transaction: a delivery row for each of the tenant's endpoints that subscribed, so a
committed transition always has its deliveries and a rolled-back one none."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy.orm import Session

from app.jobs.schemas import FineTuningJob
from app.models import Job, JobStatus, WebhookDelivery
from app.models.base import new_id
from app.repositories import webhooks

EventType = Literal[
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.paused",
]
EVENT_OF_STATUS: dict[str, EventType] = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
    JobStatus.PAUSED: "fine_tuning.job.paused",
}


def announce(session: Session, job: Job) -> None:
    """Queue the event of the status `job` just landed in (if it is one) for every subscribed endpoint."""
    event_type = EVENT_OF_STATUS.get(job.status)
    if event_type is None:
        return
    endpoints = [e for e in webhooks.endpoints_to_announce(session, job.tenant_id) if event_type in e.events]
    if not endpoints:
        return
    body = json.dumps(
        {
            "type": event_type,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": FineTuningJob.from_row(job).model_dump(mode="json"),
        },
        separators=(",", ":"),
    )
    for endpoint in endpoints:
        delivery = WebhookDelivery(
            id=new_id("msg"),
            endpoint_id=endpoint.id,
            job_id=job.id,
            event_type=event_type,
            body=body,
            status=WebhookDelivery.PENDING,
            attempts=0,
            next_attempt_at=time.time(),  # due at once
        )
        webhooks.add_delivery(session, delivery)
