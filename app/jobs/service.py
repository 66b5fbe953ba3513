"""Jobs: create (with the recipe's two dictionaries resolved), read, list, cancel, and their events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, InvalidRequest, ModelConfigUnavailable, ModelNotAvailable, NotFound
from app.files.service import get_file
from app.jobs.schemas import JobCreate
from app.models import Job, JobEvent, JobStatus, Outbox
from app.models.base import new_id, now
from app.specs import (
    DEFAULT_LEARNING_RATE,
    HYPERPARAMETER_FIELDS,
    Hyperparameters,
    PeftConfig,
    TrainingConfig,
    fit_to_model,
)


def _shorthand(request: JobCreate) -> tuple[Hyperparameters | None, str]:
    """OpenAI hyperparameters from either place they may be given, and the name of that place."""
    via_method = (
        request.method.supervised.hyperparameters if request.method and request.method.supervised else None
    )
    if request.hyperparameters and via_method and request.hyperparameters != via_method:
        raise InvalidRequest(
            "'hyperparameters' and 'method.supervised.hyperparameters' disagree; give one of them",
            param="method.supervised.hyperparameters",
            code="conflicting_parameters",
        )
    if request.hyperparameters:
        return request.hyperparameters, "hyperparameters"
    return via_method, "method.supervised.hyperparameters"


def resolve_training_config(request: JobCreate) -> TrainingConfig:
    """training_config with OpenAI's shorthand and the job seed folded in; a contradiction is a 400."""
    explicit = request.training_config.model_dump(exclude_unset=True) if request.training_config else {}
    hyperparameters, where = _shorthand(request)
    merged = dict(explicit)
    for field, value in (hyperparameters.as_training_config() if hyperparameters else {}).items():
        if field in explicit and explicit[field] != value:
            short = HYPERPARAMETER_FIELDS[field]
            raise InvalidRequest(
                f"'{where}.{short}' gives {field}={value} but 'training_config.{field}' is {explicit[field]}",
                param=f"{where}.{short}",
                code="conflicting_parameters",
            )
        merged[field] = value
    if request.seed is not None:
        if "seed" in explicit and explicit["seed"] != request.seed:
            raise InvalidRequest(
                f"'seed' is {request.seed} but 'training_config.seed' is {explicit['seed']}",
                param="seed",
                code="conflicting_parameters",
            )
        merged["seed"] = request.seed
    return TrainingConfig(**merged)


def hyperparameters_of(config: TrainingConfig) -> dict[str, Any]:
    """The OpenAI view of a resolved training_config."""
    return {
        "n_epochs": config.num_train_epochs,
        "batch_size": config.per_device_train_batch_size,
        "learning_rate_multiplier": config.learning_rate / DEFAULT_LEARNING_RATE,
    }


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: Any = None,
) -> JobEvent:
    event = JobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(event)
    return event


def create_job(session: Session, tenant_id: str, request: JobCreate, settings: Settings) -> Job:
    """Validate and store a job plus its outbox row; the caller sends the message after commit."""
    if request.model not in settings.resolved_base_models:
        available = ", ".join(sorted(settings.resolved_base_models))
        raise ModelNotAvailable(
            f"Model '{request.model}' is not configured on this server; available: {available}", param="model"
        )
    get_file(session, tenant_id, request.training_file, param="training_file")
    if request.validation_file:
        get_file(session, tenant_id, request.validation_file, param="validation_file")
    training_config = resolve_training_config(request)
    peft_config = request.peft_config or PeftConfig()
    if training_config.load_best_model_at_end and not request.validation_file:
        raise InvalidRequest(
            "load_best_model_at_end ships the lowest validation loss adapter; give a validation_file",
            param="training_config.load_best_model_at_end",
            code="validation_file_required",
        )
    training_config = fit_to_base_model(training_config, peft_config, request.model, settings)
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        model=request.model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        suffix=request.suffix,
        seed=training_config.seed,
        job_metadata=request.metadata,
        hyperparameters=hyperparameters_of(training_config),
        training_config=training_config.model_dump(mode="json"),
        peft_config=peft_config.model_dump(mode="json"),
        status=JobStatus.QUEUED,
    )
    session.add(job)
    session.flush()
    session.add(Outbox(job_id=job.id))
    add_event(session, job.id, f"Created fine-tuning job {job.id}")
    return job


def fit_to_base_model(
    training_config: TrainingConfig, peft_config: PeftConfig, model: str, settings: Settings
) -> TrainingConfig:
    """The job's training config fitted to the base model's config.json (`app.specs.fit_to_model`): a job
    the worker could not train is a 400 now, not a failure later. A configured model whose config.json the
    API cannot read is a 503: the deployment must mount it (read-only) into the API too. The generated tiny
    model is checked once it exists (`phitune serve` makes it before it starts the API)."""
    config = read_model_config(settings.resolved_base_models[model])
    if config is None:
        if not settings.base_models:
            return training_config
        raise ModelConfigUnavailable(
            f"The API cannot read config.json of base model '{model}' "
            f"({settings.resolved_base_models[model]}) to check the job against it; mount the model "
            "directory into the API read-only, as into the workers (see docker-compose.yml)",
            param="model",
        )
    try:
        return fit_to_model(training_config, peft_config, config)
    except ValueError as problem:
        param, _, message = str(problem).partition(": ")
        raise InvalidRequest(message, param=param, code="incompatible_model") from problem
    except (KeyError, TypeError) as problem:  # a field missing, or of the wrong type
        raise ModelConfigUnavailable(
            f"config.json of base model '{model}' is not a usable model config ({problem!r})", param="model"
        ) from problem


def read_model_config(base_model: str) -> dict[str, Any] | None:
    """config.json of a base model: a local directory, or a hub id already in the local hub cache (nothing
    is downloaded); None when it cannot be read or is no JSON object."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config_file = Path(base_model) / "config.json"
        if not config_file.is_file():
            cached = try_to_load_from_cache(base_model, "config.json")  # ValueError: not a hub id either
            if not isinstance(cached, str):
                return None
            config_file = Path(cached)
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable (permissions included), or not JSON
        return None
    return config if isinstance(config, dict) else None


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"No fine-tuning job '{job_id}'", param="fine_tuning_job_id", code="job_not_found")
    return job


def list_jobs_query(tenant_id: str, metadata: dict[str, str]):
    query = select(Job).where(Job.tenant_id == tenant_id)
    for key, value in metadata.items():
        query = query.where(Job.job_metadata[key].as_string() == value)
    return query


def finish_job(session: Session, job: Job, status: JobStatus, message: str, **fields: Any) -> None:
    """Move a job to a final status with an event; the attempt's token stops working."""
    job.status = status
    job.finished_at = now()
    job.lease_expires_at = None
    job.pause_requested = False  # nothing is left to pause
    for name, value in fields.items():
        setattr(job, name, value)
    level = {JobStatus.FAILED: "error", JobStatus.CANCELLED: "warn"}.get(status, "info")
    add_event(session, job.id, message, level=level)


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel at once when queued; a running job is asked to stop and does so within one logging step.
    Of concurrent requests, only the one whose conditional UPDATE matches the row writes an event: the
    UPDATE holds the row's write lock (SQLite: the database's) until commit, and then the others' no longer
    match (the job is cancelled, or its cancellation already requested)."""
    requested = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status.not_in([status for status in JobStatus if status.is_final]),
            or_(Job.status != JobStatus.RUNNING, Job.cancel_requested.is_(False)),
        )
        .values(cancel_requested=True)
    ).rowcount
    session.refresh(job)
    if requested != 1:
        if job.status != JobStatus.CANCELLED and JobStatus(job.status).is_final:
            raise Conflict(
                f"Job {job.id} already {job.status}; it cannot be cancelled", code="job_not_cancellable"
            )
        return job  # already cancelled, or its cancellation already requested
    if job.status == JobStatus.RUNNING:
        add_event(session, job.id, "Cancellation requested; the worker stops at its next step")
    else:
        paused = job.status == JobStatus.PAUSED
        finish_job(
            session,
            job,
            JobStatus.CANCELLED,
            "Job cancelled while paused" if paused else "Job cancelled before it started",
        )
    return job


def events_query(job_id: str):
    return select(JobEvent).where(JobEvent.job_id == job_id)


def events_after(session: Session, job_id: str, after_seq: int, limit: int = 100) -> list[JobEvent]:
    query = events_query(job_id).where(JobEvent.seq > after_seq).order_by(JobEvent.seq).limit(limit)
    return list(session.scalars(query))


def event_seq(session: Session, job_id: str, event_id: str) -> int:
    seq = session.scalar(select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.id == event_id))
    if seq is None:
        raise InvalidRequest(f"No event '{event_id}' in job {job_id}", param="after", code="invalid_cursor")
    return seq


def resume_point(job: Job) -> str:
    """Where the job's next attempt continues, for its events."""
    return f"step {job.resumable_step}" if job.resumable_step else "the start"


def hold_paused(session: Session, job: Job, message: str) -> None:
    """Park a running job whose pause was asked for as `paused`; resuming continues from resume_point."""
    job.status, job.pause_requested, job.lease_expires_at = JobStatus.PAUSED, False, None
    add_event(session, job.id, message)


def requeue(session: Session, job: Job, message: str, *, level: str = "info") -> None:
    """Queue a running job again as a new attempt, which resumes from its newest resume state."""
    job.status = JobStatus.QUEUED
    job.lease_expires_at = None
    session.add(Outbox(job_id=job.id))
    add_event(session, job.id, message, level=level)


def transition(session: Session, job: Job, *conditions: Any, **values: Any) -> bool:
    """Set `values` on the job's row only if it still matches `conditions`, and refresh `job`. The UPDATE …
    WHERE holds the row's lock (on SQLite the database's) until commit, so of concurrent requests exactly one
    makes a given transition; the others see the row as it is now."""
    done = session.execute(update(Job).where(Job.id == job.id, *conditions).values(**values)).rowcount == 1
    session.refresh(job)
    return done


def pause_job(session: Session, job: Job) -> Job:
    """Pause: a queued job at once; a running one is asked to save its state and stop at its next step
    (it stays `running` with `pause_requested` until it has). Pausing a paused job changes nothing."""
    if transition(session, job, Job.status == JobStatus.QUEUED, status=JobStatus.PAUSED):
        add_event(session, job.id, "Job paused before its next attempt started")
        return job
    asked = transition(
        session,
        job,
        Job.status == JobStatus.RUNNING,
        Job.pause_requested.is_(False),
        Job.cancel_requested.is_(False),
        pause_requested=True,
    )
    if asked:
        add_event(session, job.id, "Pause requested; the worker saves its state and stops at its next step")
    elif job.status == JobStatus.RUNNING and job.cancel_requested:
        raise Conflict(f"Job {job.id} is being cancelled; it cannot be paused", code="job_not_pausable")
    elif job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
        raise Conflict(
            f"Job {job.id} is {job.status}; only a queued or running job can be paused",
            code="job_not_pausable",
        )
    return job


def resume_job(session: Session, job: Job) -> Job:
    """Resume a paused job: it is queued and continues from the step it was paused at. A running job whose
    pause was asked for but not yet carried out simply goes on."""
    if transition(session, job, Job.status == JobStatus.PAUSED, status=JobStatus.QUEUED):
        session.add(Outbox(job_id=job.id))
        add_event(session, job.id, f"Job resumed; it continues from {resume_point(job)}")
        return job
    if transition(
        session, job, Job.status == JobStatus.RUNNING, Job.pause_requested.is_(True), pause_requested=False
    ):
        add_event(session, job.id, "Pause withdrawn; training goes on")
        return job
    raise Conflict(
        f"Job {job.id} is {job.status}, not paused; only a paused job can be resumed", code="job_not_paused"
    )
