"""The worker ↔ API contract: every body that crosses /internal/v1, defined once and imported by both sides.

The API validates what workers send with these models and builds its replies from them; the worker parses
the replies with the same models, so a field renamed here is renamed for both processes at once.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.job_status import JobStatus

# What a worker sends: a field the API does not know is refused (400), not dropped, so that a field renamed on
# one side only fails at once (tests/worker/test_contract.py drives the worker's client against these).
REQUEST = ConfigDict(extra="forbid")


# The levels and kinds of a job's events, as workers send them and the public API lists them.
EventLevel = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


class ResumeStateInfo(BaseModel):
    """A complete resume state of a job, as the claim lists it (newest first)."""

    id: str
    step: int
    sha256: str
    bytes: int


class ClaimReply(BaseModel):
    """What a worker learns when it starts an attempt: the job's spec and the attempt's credentials."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    attempt: int
    token: str
    model: str
    training_file: str
    validation_file: str | None
    training_config: dict[str, Any]
    peft_config: dict[str, Any]
    heartbeat_seconds: float
    lease_seconds: float = 120.0
    resume_states: list[ResumeStateInfo] = Field(default_factory=list)


class LeaseReply(BaseModel):
    """The answer to a heartbeat or an events post: the lease is renewed; what the user asked for since."""

    cancel_requested: bool
    pause_requested: bool = False


class WorkerEvent(BaseModel):
    model_config = REQUEST
    # Numbered by the worker within its attempt, so a retried post is stored once.
    seq: int | None = Field(None, ge=0, le=2**31 - 1)
    level: EventLevel = "info"
    type: EventType = "message"
    message: str = Field(max_length=4000)
    data: dict[str, Any] | None = None

    @field_validator("data")
    @classmethod
    def _finite(cls, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """A diverged run logs NaN or infinite losses, which JSON columns refuse: they are stored as null."""
        return None if data is None else {k: _finite_or_none(v) for k, v in data.items()}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class WorkerEvents(BaseModel):
    model_config = REQUEST
    events: list[WorkerEvent] = Field(max_length=1000)


class WorkerError(BaseModel):
    model_config = REQUEST
    message: str = Field(max_length=4000)
    code: str | None = None


# succeeded / failed / cancelled end the job. paused: the worker saved its state after a pause request.
# requeued: the worker was told to stop (SIGTERM: spot reclaim, redeploy) and saved its state; another worker
# continues, and the attempt does not count against the job's retries.
OutcomeStatus = Literal["succeeded", "failed", "cancelled", "paused", "requeued"]
HANDED_BACK: frozenset[OutcomeStatus] = frozenset({"paused", "requeued"})  # the attempt saved its state


class Outcome(BaseModel):
    model_config = REQUEST
    status: OutcomeStatus
    trained_tokens: int | None = None
    shipped_step: int | None = Field(
        None, description="The step whose adapter shipped (load_best_model_at_end)."
    )
    peft_unavailable_reason: str | None = Field(None, max_length=4000)
    error: WorkerError | None = None
    reason: str | None = Field(None, max_length=400, description="Why a requeued attempt stopped.")


class CheckpointReport(BaseModel):
    model_config = REQUEST
    step: int = Field(gt=0)
    metrics: dict[str, Any]


class AdapterReceipt(BaseModel):
    """The API's answer once an adapter archive is stored."""

    bytes: int
    sha256: str


class CompleteReply(BaseModel):
    """The job's status once the attempt's outcome is recorded."""

    status: JobStatus


class StateReceipt(BaseModel):
    """The API's answer once a resume state is stored and complete."""

    id: str
    step: int
    sha256: str
    bytes: int
