"""Request bodies of the jobs API and the OpenAI objects it answers with, each built from its row by
`from_row`: the one description of what the routes (and the event stream) send, and of the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from app.internal.contracts import EventLevel, EventType
from app.limits import MAX_METADATA_PAIRS, MAX_SEED, FileId, MetadataKey, MetadataValue, ModelId
from app.models import Checkpoint, Job, JobEvent, JobStatus
from app.pagination import ListPage
from app.specs import DpoConfig, DpoHyperparameters, Hyperparameters, PeftConfig, TrainingConfig


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class JobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`. training_config / peft_config are the recipe's two dictionaries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelId
    training_file: FileId
    validation_file: FileId | None = None
    suffix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_PAIRS)] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    training_config: TrainingConfig | None = None
    peft_config: PeftConfig | None = None
    dry_run: bool = Field(
        False, description="Validate and estimate (steps, tokens, time, memory) without creating the job."
    )


class JobHyperparameters(BaseModel):
    """The OpenAI view of the job's resolved training_config."""

    # A whole number as OpenAI's; training_config.num_train_epochs may be fractional, and is shown as it is.
    n_epochs: int | float = Field(union_mode="left_to_right")
    batch_size: int
    learning_rate_multiplier: float


class JobSupervisedMethod(BaseModel):
    hyperparameters: JobHyperparameters


class JobDpoHyperparameters(JobHyperparameters, DpoConfig):
    """The OpenAI view of a preference job's training_config, and its DPO settings."""


class JobDpoMethod(BaseModel):
    hyperparameters: JobDpoHyperparameters


class JobMethod(BaseModel):
    """The job's method: supervised (a null `jobs.method`) or dpo; only its own key is shown."""

    type: Literal["supervised", "dpo"]
    supervised: JobSupervisedMethod | None = Field(None, exclude_if=lambda value: value is None)
    dpo: JobDpoMethod | None = Field(None, exclude_if=lambda value: value is None)

    @classmethod
    def of(cls, method: dict[str, Any] | None, hyperparameters: JobHyperparameters) -> JobMethod:
        dpo = DpoConfig.of_method(method)
        if dpo is None:
            return cls(type="supervised", supervised=JobSupervisedMethod(hyperparameters=hyperparameters))
        shown = JobDpoHyperparameters(**hyperparameters.model_dump(), **dpo.model_dump())
        return cls(type="dpo", dpo=JobDpoMethod(hyperparameters=shown))


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    epoch: int | float | None
    percent: float

    @classmethod
    def of(cls, job: Job | Row) -> JobProgress:
        progress = job.progress or {}
        step, total = progress.get("step", 0), progress.get("total_steps")
        percent = (
            100.0 if job.status == JobStatus.SUCCEEDED else round(100.0 * step / total, 1) if total else 0.0
        )
        return cls(step=step, total_steps=total, epoch=progress.get("epoch"), percent=percent)


class FineTuningJob(BaseModel):
    """The OpenAI fine_tuning.job object, phitune's extensions after the OpenAI fields."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    hyperparameters: JobHyperparameters
    method: JobMethod
    training_file: str
    validation_file: str | None
    result_files: list[str] = Field(
        description="On success, the file of the per-step metrics (a CSV, purpose fine-tune-results)."
    )
    trained_tokens: int | None
    seed: int
    estimated_finish: int | None
    metadata: dict[str, str] | None
    error: JobError | None
    training_config: dict[str, Any] = Field(description="The resolved TrainingConfig (the job's recipe).")
    peft_config: dict[str, Any] = Field(description="The resolved PeftConfig (the job's recipe).")
    progress: JobProgress
    attempt: int = Field(description="Attempts started so far (a lost worker's job is attempted again).")
    cancel_requested: bool
    pause_requested: bool
    resumable_step: int | None = Field(description="The step a resumed attempt continues from.")
    shipped_step: int | None = Field(description="The step whose adapter the job ships, if not the last.")

    @classmethod
    def from_row(cls, job: Job | Row) -> FineTuningJob:
        hyperparameters = JobHyperparameters.model_validate(job.hyperparameters)
        return cls(
            id=job.id,
            created_at=job.created_at,
            finished_at=job.finished_at,
            model=job.model,
            fine_tuned_model=job.fine_tuned_model,
            organization_id=job.tenant_id,
            status=JobStatus(job.status),
            hyperparameters=hyperparameters,
            method=JobMethod.of(job.method, hyperparameters),
            training_file=job.training_file,
            validation_file=job.validation_file,
            result_files=[job.result_file] if job.result_file else [],
            trained_tokens=job.trained_tokens,
            seed=job.seed,
            estimated_finish=None,
            metadata=job.job_metadata,
            error=JobError.model_validate(job.error) if job.error else None,
            training_config=job.training_config,
            peft_config=job.peft_config,
            progress=JobProgress.of(job),
            attempt=job.attempt,
            cancel_requested=job.cancel_requested,
            pause_requested=job.pause_requested,
            resumable_step=job.resumable_step,
            shipped_step=job.shipped_step,
        )


class JobList(ListPage[FineTuningJob]):
    pass


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: EventLevel
    message: str
    type: EventType
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: JobEvent) -> FineTuningJobEvent:
        return cls.model_validate(
            {
                "id": event.id,
                "created_at": event.created_at,
                "level": event.level,
                "message": event.message,
                "type": event.type,
                "data": event.data,
            }
        )


class JobEventList(ListPage[FineTuningJobEvent]):
    pass


class JobCheckpoint(BaseModel):
    """The OpenAI fine_tuning.job.checkpoint object: a checkpoint stored during training, callable by name."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, checkpoint: Checkpoint) -> JobCheckpoint:
        return cls(
            id=checkpoint.id,
            created_at=checkpoint.created_at,
            fine_tuning_job_id=checkpoint.job_id,
            step_number=checkpoint.step_number,
            fine_tuned_model_checkpoint=checkpoint.fine_tuned_model_checkpoint,
            metrics=checkpoint.metrics,
        )


class JobCheckpointList(ListPage[JobCheckpoint]):
    pass
