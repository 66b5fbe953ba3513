"""Tenants, API keys, files, jobs, job events, checkpoints, resume states, the job outbox, webhook endpoints
and their deliveries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, now


class Tenant(Base):
    __tablename__ = "tenants"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # `key-…`: names the key to list and revoke it
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; keys are 256-bit random
    prefix: Mapped[str] = mapped_column(String(16))  # shown to humans to tell keys apart
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Many-to-one, loaded with the key: every listed key shows its tenant's name.
    tenant: Mapped[Tenant] = relationship(lazy="joined", innerjoin=True)


class File(Base):
    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Job(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    peft_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The resolved method of a preference (DPO) job, {"type": "dpo", "dpo": {...}}; null for supervised.
    method: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), unique=True, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    attempt_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Attempts whose worker vanished (lease expired); a preempted or paused attempt does not count.
    lost_attempts: Mapped[int] = mapped_column(Integer, default=0)
    resumable_step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # newest complete resume state
    shipped_step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the step whose adapter shipped
    # The file of its metrics (app.jobs.results), made on success; null again once the tenant deletes it.
    result_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    peft_unavailable_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_deleted_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    # A worker numbers its events within an attempt; a retried post of the same event is stored once.
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "worker_seq", name="uq_job_events_job_attempt_worker_seq"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)  # set on events a worker posted
    worker_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(300), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Artifact(Base):
    """A stored adapter archive: a job's final adapter or a checkpoint's, in one download format."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "scope", "format", name="uq_artifacts_job_scope_format"),)

    FINAL = "final"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(64))  # FINAL, or "step-N" for a checkpoint
    format: Mapped[str] = mapped_column(String(16))  # "peft" or "loralib"
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class ResumeState(Base):
    """A complete training state (adapter, optimizer, scheduler, RNG, trainer state) a new attempt continues
    from. A row exists only once every byte arrived and its sha256 matched; not a user-visible checkpoint."""

    __tablename__ = "resume_states"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)  # a 3.8B model's state at a high rank passes 2 GiB
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Outbox(Base):
    """Job messages to send to the broker once the creating transaction has committed."""

    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    sent_at: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class IdempotencyKey(Base):
    """A remembered Idempotency-Key: which object a request created, and a hash of that request."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("tenant_id", "route", "key", name="uq_idempotency_keys_tenant_route_key"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    route: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(Integer, default=now, index=True)


class WebhookEndpoint(Base):
    """A tenant's URL that is sent the job events it subscribed to, signed with its secret."""

    __tablename__ = "webhook_endpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))  # `whsec_…`: HMAC needs it in the clear
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class WebhookDelivery(Base):
    """One event for one endpoint, written in the transaction of the job's transition, until it is delivered
    or its retries are used up. `id` is the `webhook-id` every attempt carries."""

    __tablename__ = "webhook_deliveries"
    # The sender's question, every poll: which pending deliveries are due.
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # the exact bytes signed and sent on every attempt
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # started, counted when claimed
    # When it is due; while an attempt runs, when that attempt's claim lapses (its sender died).
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    delivered_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Export(Base):
    """A job's adapter merged into its base model by a worker: a Hugging Face directory, stored as a tar
    (app.exports). Queued, claimed by one attempt at a time under a lease, then succeeded or failed."""

    __tablename__ = "exports"

    QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sent_at: Mapped[int | None] = mapped_column(Integer, nullable=True)  # its last broker message
    storage_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # a merged 3.8B model: ~7.6 GB
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
