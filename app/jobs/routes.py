"""/v1/fine_tuning/jobs: create, list, get, cancel, events (paged or live), adapter download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import Row

from app.adapter_format import Format
from app.config import Settings
from app.db import after_commit, release_connection
from app.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep, TenantRoute
from app.errors import error_responses
from app.jobs import artifacts, checkpoints, estimate, service
from app.jobs.estimate import JobCreateResponse, JobEstimate
from app.jobs.event_stream import SlotStream
from app.jobs.schemas import FineTuningJob, JobCheckpointList, JobCreate, JobEventList, JobList
from app.openapi_parts import MAX_CURSOR_CHARS, After, IdempotencyKey, Limit, Order, event_stream
from app.storage import blob_response

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(401, 429, 503))

EVENT_STREAM = {
    "description": "With `?stream=true` or `Accept: text/event-stream`: server-sent events, each with the "
    "event's `id`, its `type` as `event` and the event as `data`, ending with `event: done` once the job is "
    "final.",
    "content": {"text/event-stream": event_stream("FineTuningJobEvent", last_data="{}")},
}
ADAPTER_ARCHIVE = {
    "description": "The adapter as a .tar.gz",
    "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
}


@router.post("", response_model=JobCreateResponse, responses=error_responses(400, 404, 413, 422))
def create_job(
    body: JobCreate,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    idempotency_key: IdempotencyKey = None,
) -> FineTuningJob | JobEstimate:
    """Create a job; with an Idempotency-Key a retried request returns the job the first one created. With
    `"dry_run": true`: the job validated and resolved, and what it would take (a `fine_tuning.job.estimate`);
    nothing is created, queued or remembered under the key."""
    if body.dry_run:
        return estimate.dry_run(session, tenant.id, body, settings, storage)
    job = service.create_job_once(session, tenant.id, body, settings, idempotency_key)
    after_commit(session, lambda: request.app.state.messages.send_now(job.id))
    return FineTuningJob.from_row(job)


@router.get("", response_model=JobList, responses=error_responses(400))
def list_jobs(
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
) -> JobList:
    # `?metadata[team]=search` filters; FastAPI cannot declare bracketed names, so read them directly.
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return service.list_jobs(session, tenant.id, metadata, limit=limit, after=after)


async def get_job(fine_tuning_job_id: str, request: Request, tenant: CurrentTenant) -> Response:
    # The endpoint every poller calls: called by TenantRoute, not through FastAPI's dependency solving; one
    # plain read, no unit of work (see app.db.read), and the model serialised once, as FastAPI would (by
    # alias), into the response: not validated again by response_model, which stays for the OpenAPI document.
    settings: Settings = request.app.state.settings
    job = await service.read_job(settings.resolved_database_url, tenant.id, fine_tuning_job_id)
    return Response(_body(job), media_type="application/json")


# id(row) → (the row, its JSON): on SQLite an unchanged job is read as the same row object (app.db.read), so
# its body is made once (validating and serialising it was ~15 % of a poll's CPU in the app). The row is kept
# beside its body, so its id is not reused while the entry lives.
_BODIES: dict[int, tuple[Row, bytes]] = {}
KEPT_BODIES = 1024


def _body(job: Row) -> bytes:
    if (kept := _BODIES.get(id(job))) is not None and kept[0] is job:
        return kept[1]
    if len(_BODIES) >= KEPT_BODIES:
        _BODIES.clear()
    body = FineTuningJob.from_row(job).model_dump_json(by_alias=True).encode()
    _BODIES[id(job)] = (job, body)
    return body


router.add_api_route(
    "/{fine_tuning_job_id}",
    get_job,
    methods=["GET"],
    response_model=FineTuningJob,
    responses=error_responses(404),
    route_class_override=TenantRoute,
)


@router.post(
    "/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=error_responses(404, 409)
)
def cancel_job(fine_tuning_job_id: str, tenant: CurrentTenant, session: SessionDep) -> FineTuningJob:
    job = service.cancel_job(session, service.get_job(session, tenant.id, fine_tuning_job_id))
    return FineTuningJob.from_row(job)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob, responses=error_responses(404, 409))
def pause_job(fine_tuning_job_id: str, tenant: CurrentTenant, session: SessionDep) -> FineTuningJob:
    """Pause: the worker saves the training state and frees the GPU; the job becomes `paused`."""
    job = service.pause_job(session, service.get_job(session, tenant.id, fine_tuning_job_id))
    return FineTuningJob.from_row(job)


@router.post(
    "/{fine_tuning_job_id}/resume", response_model=FineTuningJob, responses=error_responses(404, 409)
)
def resume_job(
    request: Request, fine_tuning_job_id: str, tenant: CurrentTenant, session: SessionDep
) -> FineTuningJob:
    """Resume a paused job: queued again, it continues from the step it was paused at."""
    job = service.resume_job(session, service.get_job(session, tenant.id, fine_tuning_job_id))
    after_commit(session, lambda: request.app.state.messages.send_now(job.id))  # only a committed job is sent
    return FineTuningJob.from_row(job)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=JobEventList,
    responses={200: EVENT_STREAM, **error_responses(400, 404)},
)
def list_events(
    fine_tuning_job_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
    order: Order = "desc",
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
):
    """Events newest first as OpenAI lists them (`order=asc`: oldest first); `after` is the last id of the
    previous page in either order. `?stream=true` follows live, oldest first, from `after` (or
    `Last-Event-ID`) on."""
    job = service.get_job(session, tenant.id, fine_tuning_job_id)
    if stream or "text/event-stream" in (accept or ""):
        cursor = after or last_event_id
        after_seq = service.event_seq(session, job.id, cursor) if cursor else 0
        # The unit of work ends here, with no I/O left for when the route returns: the tenant's stream slot,
        # taken last, is then given back only by the response, which nothing can now keep from being sent.
        release_connection(session)
        give_back = request.app.state.stream_slots.take(tenant.id)
        return SlotStream(
            request.app.state.events.follow(job.id, after_seq),
            give_back,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return service.list_events(session, job, limit=limit, after=after, newest_first=order == "desc")


@router.get(
    "/{fine_tuning_job_id}/checkpoints", response_model=JobCheckpointList, responses=error_responses(400, 404)
)
def list_checkpoints(
    fine_tuning_job_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Limit = 10,
    after: After = None,
):
    """Checkpoints stored during training, newest first, each with its metrics and callable model id."""
    job = service.get_job(session, tenant.id, fine_tuning_job_id)
    return checkpoints.list_page(session, job, limit=limit, after=after)


@router.get(
    "/{fine_tuning_job_id}/adapter",
    response_class=FileResponse,
    responses={200: ADAPTER_ARCHIVE, **error_responses(400, 404, 409)},
)
def download_adapter(
    fine_tuning_job_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    format: Annotated[Format | None, Query(description="The archive's format; default `peft`.")] = None,
    checkpoint: Annotated[
        str | None, Query(max_length=MAX_CURSOR_CHARS, description="A checkpoint's id (`ftckpt-…`).")
    ] = None,
):
    """The trained adapter as a .tar.gz: `format=peft` (default; `PeftModel.from_pretrained` loads it once
    extracted) or `format=loralib`; `checkpoint=ftckpt-…` for an intermediate one. Range and ETag work."""
    job = service.get_job(session, tenant.id, fine_tuning_job_id)
    artifact = artifacts.for_download(session, job, fmt=format, checkpoint_id=checkpoint)
    name = (job.fine_tuned_model or job.id).replace(":", "_")
    suffix = f"-{checkpoint}" if checkpoint else ""
    return blob_response(
        request,
        storage,
        artifact.storage_key,
        etag=f'"{artifact.sha256}"',
        media_type="application/gzip",
        filename=f"{name}{suffix}.{artifact.format}.tar.gz",
    )
