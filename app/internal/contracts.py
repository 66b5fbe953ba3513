"""The worker ↔ API contract: every body that crosses /internal/v1, defined once and imported by both sides.

The API validates what workers send with these models and builds its replies from them; the worker parses
the replies with the same models, so a field renamed here is renamed for both processes at once.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator

from app.job_status import JobStatus
from app.limits import (
    MAX_DATA_INT,
    MAX_DATA_PAIRS,
    MAX_DATA_VALUE_CHARS,
    MAX_REPORTED_STEP,
    MAX_TRAINED_TOKENS,
    MIN_DATA_INT,
    DataKey,
    ErrorCode,
    EventMessage,
    Reason,
    valid_unicode,
)

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
    suffix: str | None = None  # names the job's tracker runs (worker.trackers)
    training_file: str
    validation_file: str | None
    training_config: dict[str, Any]
    peft_config: dict[str, Any]
    heartbeat_seconds: float
    lease_seconds: float = 120.0
    resume_states: list[ResumeStateInfo] = Field(default_factory=list)
    # The job's method (app.specs.DpoConfig.as_method) for a preference job; left out of a supervised job's
    # claim (null), which stays as workers of earlier versions take it.
    method: dict[str, Any] | None = Field(None, exclude_if=lambda value: value is None)


DPO_METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margins",
    "rewards/accuracies": "rewards_accuracies",
}
"""TRL's DPO metrics and the names a preference job's metrics events carry them under: `train_<name>` for the
logged steps, `eval_<name>` for the evaluated ones (the job's result file reads them)."""


class LeaseReply(BaseModel):
    """The answer to a heartbeat or an events post: the lease is renewed; what the user asked for since."""

    cancel_requested: bool
    pause_requested: bool = False


# What a worker reports is stored and read back by the tenant's every read of the job, its events and its
# checkpoints: every string is valid Unicode and bounded, every number bounded, so that nothing a worker sends
# can make those reads fail or swell (the request models below; the replies are the API's own).
Step = Annotated[int, Field(gt=0, le=MAX_REPORTED_STEP)]


def _scalar(value: Any) -> Any:
    """A value of an event's data or of a checkpoint's metrics: a scalar, as the worker's figures are (a loss,
    a step, a byte count, a device name), never a list or an object. A diverged run logs NaN or infinite
    losses, which JSON columns refuse: they are stored as null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not MIN_DATA_INT <= value <= MAX_DATA_INT:
            raise ValueError("an integer must be within the signed 64-bit range")
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        valid_unicode(value)
        if len(value) > MAX_DATA_VALUE_CHARS:
            raise ValueError(f"a string must have at most {MAX_DATA_VALUE_CHARS} characters")
        return value
    raise ValueError("must be a string, a number, a boolean or null")


DataValue = Annotated[Any, PlainValidator(_scalar)]
Data = Annotated[dict[DataKey, DataValue], Field(max_length=MAX_DATA_PAIRS)]


class WorkerEvent(BaseModel):
    model_config = REQUEST
    # Numbered by the worker within its attempt, so a retried post is stored once.
    seq: int | None = Field(None, ge=0, le=2**31 - 1)
    level: EventLevel = "info"
    type: EventType = "message"
    message: EventMessage
    data: Data | None = None

    @field_validator("data")
    @classmethod
    def _progress(cls, data: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        """A metrics event's step, total_steps and epoch become the job's progress, which every read of the
        job computes with: they must be numbers of the kinds it expects."""
        if info.data.get("type") == "metrics" and data and "step" in data:
            step, total, epoch = (data.get(key) for key in ("step", "total_steps", "epoch"))
            if not _steps(step) or not (total is None or _steps(total)):
                raise ValueError("a metrics event's step and total_steps must be whole numbers of steps")
            if not (epoch is None or _number(epoch)):
                raise ValueError("a metrics event's epoch must be a number")
        return data


def _steps(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_REPORTED_STEP


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class WorkerEvents(BaseModel):
    model_config = REQUEST
    events: list[WorkerEvent] = Field(max_length=1000)


class WorkerError(BaseModel):
    model_config = REQUEST
    message: EventMessage
    code: ErrorCode | None = None


# succeeded / failed / cancelled end the job. paused: the worker saved its state after a pause request.
# requeued: the worker was told to stop (SIGTERM: spot reclaim, redeploy) and saved its state; another worker
# continues, and the attempt does not count against the job's retries.
OutcomeStatus = Literal["succeeded", "failed", "cancelled", "paused", "requeued"]
HANDED_BACK: frozenset[OutcomeStatus] = frozenset({"paused", "requeued"})  # the attempt saved its state


class Outcome(BaseModel):
    model_config = REQUEST
    status: OutcomeStatus
    trained_tokens: int | None = Field(None, ge=0, le=MAX_TRAINED_TOKENS)
    shipped_step: Step | None = Field(
        None, description="The step whose adapter shipped (load_best_model_at_end)."
    )
    peft_unavailable_reason: EventMessage | None = None
    error: WorkerError | None = None
    reason: Reason | None = Field(None, description="Why a requeued attempt stopped.")


class CheckpointReport(BaseModel):
    model_config = REQUEST
    step: Step
    metrics: Data

    @field_validator("metrics")
    @classmethod
    def _ranked(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """valid_loss ranks the checkpoints that load_best_model_at_end keeps: a number or null."""
        if not (metrics.get("valid_loss") is None or _number(metrics["valid_loss"])):
            raise ValueError("metrics.valid_loss must be a number or null")
        return metrics


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


# Merged-model exports (app.exports, worker.export)


class ExportClaimReply(BaseModel):
    """What a worker learns when it starts an attempt at an export: the job's base model, and the
    attempt's credentials (its token authorises the export's other internal routes)."""

    model_config = ConfigDict(extra="ignore")

    export_id: str
    job_id: str
    attempt: int
    token: str
    model: str
    heartbeat_seconds: float
    lease_seconds: float


class ExportFailure(BaseModel):
    """Why an export attempt could not make the merged model."""

    model_config = REQUEST
    message: EventMessage


class ExportReceipt(BaseModel):
    """The API's answer once a merged archive is stored and complete."""

    bytes: int
    sha256: str


class ExportLease(BaseModel):
    """The answer to an export attempt's heartbeat."""

    lease_expires_at: int
