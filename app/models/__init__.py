"""SQL tables. Public ids are prefixed strings; an integer `seq` gives stable cursor order."""

from app.job_status import JobStatus
from app.models.base import Base
from app.models.tables import (
    ApiKey,
    Artifact,
    Checkpoint,
    File,
    IdempotencyKey,
    Job,
    JobEvent,
    Outbox,
    ResumeState,
    Tenant,
    WebhookDelivery,
    WebhookEndpoint,
)

__all__ = [
    "ApiKey",
    "Artifact",
    "Base",
    "Checkpoint",
    "File",
    "IdempotencyKey",
    "Job",
    "JobEvent",
    "JobStatus",
    "Outbox",
    "ResumeState",
    "Tenant",
    "WebhookDelivery",
    "WebhookEndpoint",
]
