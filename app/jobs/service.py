"""Jobs: create (with the recipe's two dictionaries resolved), read, list, cancel, pause, resume, and their
events. Every status change goes through app.jobs.states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import db, idempotency, trackers
from app.config import Settings
from app.dataset_format import PREFERENCE
from app.errors import (
    Conflict,
    InvalidRequest,
    LimitReached,
    ModelConfigUnavailable,
    NotFound,
)
from app.files.service import get_dataset
from app.jobs import init_from, states
from app.jobs.schemas import JobCreate, JobEventList, JobList
from app.jobs.states import Transition
from app.models import File, Job, JobEvent, JobStatus
from app.models.base import new_id
from app.pagination import paginate
from app.repositories import jobs, tenants
from app.specs import (
    DEFAULT_LEARNING_RATE,
    HYPERPARAMETER_FIELDS,
    DpoConfig,
    DpoHyperparameters,
    Hyperparameters,
    PeftConfig,
    TrainingConfig,
    fit_to_model,
)

IDEMPOTENCY_ROUTE = "fine_tuning.jobs"
J = TypeVar("J", Job, Row)


def _shorthand(request: JobCreate) -> tuple[Hyperparameters | None, str]:
    """OpenAI hyperparameters from either place they may be given, and the name of that place."""
    method = request.method
    via_method: Hyperparameters | None
    if method is not None and method.type == "dpo":
        via_method, where = method.dpo.hyperparameters if method.dpo else None, "method.dpo.hyperparameters"
    else:
        via_method = method.supervised.hyperparameters if method and method.supervised else None
        where = "method.supervised.hyperparameters"
    # Compared by the training_config they set: the dpo ones carry beta besides.
    given = request.hyperparameters
    if given and via_method and given.as_training_config() != via_method.as_training_config():
        raise InvalidRequest(
            f"'hyperparameters' and '{where}' disagree; give one of them",
            param=where,
            code="conflicting_parameters",
        )
    if request.hyperparameters:
        return request.hyperparameters, "hyperparameters"
    return via_method, where


def resolve_method(request: JobCreate) -> DpoConfig | None:
    """The DPO settings of a preference job, None for a supervised one; a method that contradicts itself is
    a 400 naming the field."""
    method = request.method
    if method is None:
        return None
    other = "supervised" if method.type == "dpo" else "dpo"
    if getattr(method, other) is not None:
        raise InvalidRequest(
            f"'method.{other}' is given but method.type is '{method.type}'",
            param=f"method.{other}",
            code="invalid_value",
        )
    if method.type != "dpo":
        return None
    hyperparameters = (method.dpo.hyperparameters if method.dpo else None) or DpoHyperparameters()
    try:
        return hyperparameters.as_dpo_config()
    except ValidationError as problem:  # label_smoothing with a loss_type that has none
        raise InvalidRequest(
            problem.errors()[0]["msg"].removeprefix("Value error, "),
            param="method.dpo.hyperparameters.label_smoothing",
            code="invalid_value",
        ) from None


# What a DPO job cannot do, each with the reason: a request asking for it is a 400 rather than a job that
# silently trains otherwise.
_NOT_WITH_DPO = {
    "training_config.packing": "a preference pair is compared whole; it cannot be packed with others",
    "training_config.train_on_inputs": "DPO compares the two answers; the input is never trained on",
    "training_config.group_by_length": "preference batches are not grouped by length",
}


def check_dpo_job(training_config: TrainingConfig, peft_config: PeftConfig) -> TrainingConfig:
    """400 naming the field for what a DPO job does not support; else `training_config` as the job trains:
    padding_free off unless asked for (then a 400), since pairs are batched padded."""
    for param, reason in _NOT_WITH_DPO.items():
        if getattr(training_config, param.rpartition(".")[2]):
            raise InvalidRequest(
                f"{param} is not supported with method 'dpo': {reason}", param=param, code="invalid_value"
            )
    if training_config.padding_free and "padding_free" in training_config.model_fields_set:
        raise InvalidRequest(
            "training_config.padding_free is not supported with method 'dpo': preference pairs are batched "
            "padded",
            param="training_config.padding_free",
            code="invalid_value",
        )
    if peft_config.backend != "peft":
        raise InvalidRequest(
            "peft_config.backend 'loralib' is not supported with method 'dpo': DPO takes its reference from "
            "the base with PEFT's adapter disabled; use backend 'peft'",
            param="peft_config.backend",
            code="invalid_value",
        )
    return training_config.model_copy(update={"padding_free": False})


def check_file_format(file: File, dpo: DpoConfig | None, param: str) -> None:
    """A DPO job trains on a preference file and a supervised job on any other: a 400 naming `param`."""
    file_format = file.stats.get("format")
    if dpo is not None and file_format != PREFERENCE:
        raise InvalidRequest(
            f"File {file.id} is in {file_format} format; a DPO job trains on a preference file (each line "
            '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]})',
            param=param,
            code="invalid_file_format",
        )
    if dpo is None and file_format == PREFERENCE:
        raise InvalidRequest(
            f"File {file.id} is a preference file, which trains a DPO job: give method "
            '{"type": "dpo"}, or a chat, prompt_completion or text file',
            param=param,
            code="invalid_file_format",
        )


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
    config = TrainingConfig(**merged)
    _check_intervals(config, set(explicit))
    return config


def _check_intervals(config: TrainingConfig, given: set[str]) -> None:
    """An interval given longer than max_steps would never come round: no metrics event, evaluation or
    checkpoint before the end. A 400 naming it, rather than a job that silently does less than asked."""
    if config.max_steps < 1:
        return  # trained by epochs: the steps are known once the worker has read the file
    for field in ("logging_steps", "eval_steps", "save_steps"):
        interval = getattr(config, field)
        if field in given and interval is not None and interval > config.max_steps:
            raise InvalidRequest(
                f"training_config.{field} is {interval}, more than max_steps ({config.max_steps}): it would "
                "never come round",
                param=f"training_config.{field}",
                code="invalid_value",
            )


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
    return jobs.add_event(session, job_id, message, level=level, type=type, data=data)


def create_job_once(
    session: Session, tenant_id: str, request: JobCreate, settings: Settings, idempotency_key: str | None
) -> Job:
    """`create_job`; with an Idempotency-Key a retried request gets the job the first one created."""
    return idempotency.create_once(
        session,
        tenant_id,
        IDEMPOTENCY_ROUTE,
        idempotency_key,
        request.model_dump(mode="json"),
        create=lambda: create_job(session, tenant_id, request, settings),
        object_id=lambda job: job.id,
        load=lambda job_id: get_job(session, tenant_id, job_id),
    )


def create_job(session: Session, tenant_id: str, request: JobCreate, settings: Settings) -> Job:
    """Validate and store a job plus its outbox row; the caller sends the message after commit. A dry run
    returns the job validated and resolved, and stores nothing."""
    start = init_from.starting_point(session, tenant_id, request, settings)
    dpo = resolve_method(request)
    training_file = get_dataset(session, tenant_id, request.training_file, param="training_file")
    check_file_format(training_file, dpo, "training_file")
    if request.validation_file:
        validation_file = get_dataset(session, tenant_id, request.validation_file, param="validation_file")
        check_file_format(validation_file, dpo, "validation_file")
    training_config = resolve_training_config(request)
    if start.name is not None:
        training_config = training_config.model_copy(update={"init_from": start.name})
    peft_config = start.peft_config(request.peft_config)
    if dpo is not None:
        training_config = check_dpo_job(training_config, peft_config)
    if training_config.early_stopping_patience and not request.validation_file:
        raise InvalidRequest(
            "early_stopping_patience stops training once the validation loss stops improving; give a "
            "validation_file",
            param="training_config.early_stopping_patience",
            code="validation_file_required",
        )
    if training_config.load_best_model_at_end and not request.validation_file:
        raise InvalidRequest(
            "load_best_model_at_end ships the lowest validation loss adapter; give a validation_file",
            param="training_config.load_best_model_at_end",
            code="validation_file_required",
        )
    training_config = fit_to_base_model(training_config, peft_config, start.base_model, settings)
    try:
        trackers.check_offered(training_config.report_to, settings)
    except ValueError as refusal:
        raise InvalidRequest(
            str(refusal), param="training_config.report_to", code="tracker_not_configured"
        ) from None
    check_active_jobs(session, tenant_id, settings.max_active_jobs_per_tenant)
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        model=start.base_model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        suffix=request.suffix,
        seed=training_config.seed,
        job_metadata=request.metadata,
        hyperparameters=hyperparameters_of(training_config),
        training_config=training_config.model_dump(mode="json"),
        peft_config=peft_config.model_dump(mode="json"),
        method=dpo.as_method() if dpo else None,
        status=JobStatus.QUEUED,
    )
    if request.dry_run:
        return job  # validated and resolved, never stored: app.jobs.estimate reads it
    jobs.add(session, job)
    jobs.add_message(session, job.id)
    add_event(session, job.id, f"Created fine-tuning job {job.id}")
    return job


def check_active_jobs(session: Session, tenant_id: str, limit: int) -> None:
    """429 `too_many_active_jobs` when the tenant's unfinished jobs (queued, running or paused: a paused job
    resumes without asking) number `limit` already; 0 is no limit. Refused, not queued behind: a job
    accepted is one the tenant sees queued, and a refusal says now what waiting would only hide. The tenant
    is locked first, so 20 concurrent creates count one after another and never pass the limit together."""
    if not limit:
        return
    tenants.lock(session, tenant_id)
    active = jobs.unfinished_count(session, tenant_id)
    if active >= limit:
        raise LimitReached(
            f"This API key's tenant has {active} unfinished fine-tuning jobs (queued, running or paused), "
            "the most this server allows; cancel one or wait until one ends",
            code="too_many_active_jobs",
        )


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
    return _found(jobs.get_for_tenant(session, tenant_id, job_id), job_id)


async def read_job(database_url: str, tenant_id: str, job_id: str) -> Row:
    """The job as a row read outside a unit of work: what GET, the route every poller calls, needs."""
    return _found(await db.read(database_url, jobs.record_for_tenant, tenant_id, job_id), job_id)


def _found(job: J | None, job_id: str) -> J:
    if job is None:
        raise NotFound(f"No fine-tuning job '{job_id}'", param="fine_tuning_job_id", code="job_not_found")
    return job


def list_jobs(
    session: Session, tenant_id: str, metadata: dict[str, str], *, limit: int, after: str | None
) -> JobList:
    """The tenant's jobs, newest first, those whose metadata holds every given pair."""
    query = jobs.list_query(tenant_id, metadata)
    return paginate(session, query, limit=limit, after=after, newest_first=True, into=JobList)


def list_events(
    session: Session, job: Job, *, limit: int, after: str | None, newest_first: bool
) -> JobEventList:
    """A page of the job's events, after the event whose id is `after` in the order asked for."""
    query = jobs.events_query(job.id)
    return paginate(session, query, limit=limit, after=after, newest_first=newest_first, into=JobEventList)


def finish_job(session: Session, job: Job, status: JobStatus, message: str, **fields: Any) -> None:
    """End a running job in a final status with an event; the attempt's token stops working.
    IllegalTransition if the job is no longer running."""
    states.transition(session, job, states.FINISH[status], **fields)
    level = {JobStatus.FAILED: "error", JobStatus.CANCELLED: "warn"}.get(status, "info")
    add_event(session, job.id, message, level=level)


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel at once when queued or paused; a running job is asked to stop and does so within one logging
    step. Of concurrent requests only the one whose guarded UPDATE matches the row writes an event (see
    app.jobs.states); the others find the job cancelled, or its cancellation already requested."""
    try:
        done = states.first_of(
            session, job, Transition.CANCEL_QUEUED, Transition.CANCEL_PAUSED, Transition.REQUEST_CANCEL
        )
    except states.IllegalTransition:
        if job.status != JobStatus.CANCELLED:
            raise Conflict(
                f"Job {job.id} already {job.status}; it cannot be cancelled", code="job_not_cancellable"
            ) from None
        return job  # already cancelled
    if done == Transition.REQUEST_CANCEL:
        add_event(session, job.id, "Cancellation requested; the worker stops at its next step")
    elif done is not None:
        paused = done == Transition.CANCEL_PAUSED
        message = "Job cancelled while paused" if paused else "Job cancelled before it started"
        add_event(session, job.id, message, level="warn")
    return job  # done is None: its cancellation was already requested


def event_seq(session: Session, job_id: str, event_id: str) -> int:
    seq = jobs.event_seq(session, job_id, event_id)
    if seq is None:
        raise InvalidRequest(f"No event '{event_id}' in job {job_id}", param="after", code="invalid_cursor")
    return seq


def resume_point(job: Job) -> str:
    """Where the job's next attempt continues, for its events."""
    return f"step {job.resumable_step}" if job.resumable_step else "the start"


def hold_paused(session: Session, job: Job, message: str) -> None:
    """Park a running job whose pause was asked for as `paused`; resuming continues from resume_point."""
    states.transition(session, job, Transition.PARK_PAUSED)
    add_event(session, job.id, message)


def requeue(session: Session, job: Job, message: str, *, level: str = "info") -> None:
    """Queue a running job again as a new attempt, which resumes from its newest resume state."""
    states.transition(session, job, Transition.REQUEUE)
    jobs.add_message(session, job.id)
    add_event(session, job.id, message, level=level)


def pause_job(session: Session, job: Job) -> Job:
    """Pause: a queued job at once; a running one is asked to save its state and stop at its next step
    (it stays `running` with `pause_requested` until it has). Pausing a paused job changes nothing."""
    try:
        done = states.first_of(session, job, Transition.PAUSE_QUEUED, Transition.REQUEST_PAUSE)
    except states.IllegalTransition:
        if job.status == JobStatus.PAUSED:
            return job
        raise Conflict(
            f"Job {job.id} is {job.status}; only a queued or running job can be paused",
            code="job_not_pausable",
        ) from None
    if done == Transition.PAUSE_QUEUED:
        add_event(session, job.id, "Job paused before its next attempt started")
    elif done == Transition.REQUEST_PAUSE:
        add_event(session, job.id, "Pause requested; the worker saves its state and stops at its next step")
    elif job.cancel_requested:
        raise Conflict(f"Job {job.id} is being cancelled; it cannot be paused", code="job_not_pausable")
    return job  # its pause was already requested


def resume_job(session: Session, job: Job) -> Job:
    """Resume a paused job: it is queued and continues from the step it was paused at. A running job whose
    pause was asked for but not yet carried out simply goes on."""
    try:
        done = states.first_of(session, job, Transition.RESUME, Transition.WITHDRAW_PAUSE)
    except states.IllegalTransition:
        done = None
    if done == Transition.RESUME:
        jobs.add_message(session, job.id)
        add_event(session, job.id, f"Job resumed; it continues from {resume_point(job)}")
        return job
    if done == Transition.WITHDRAW_PAUSE:
        add_event(session, job.id, "Pause withdrawn; training goes on")
        return job
    raise Conflict(
        f"Job {job.id} is {job.status}, not paused; only a paused job can be resumed", code="job_not_paused"
    )
