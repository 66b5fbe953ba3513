"""The training task: claim a job through the API, run the recipe, report progress and the adapter back."""

from __future__ import annotations

import contextvars
import itertools
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app import log_setup
from app.adapter_format import Format
from app.config import Settings
from app.internal.contracts import ClaimReply, LeaseReply
from app.specs import DpoConfig, PeftConfig, TrainingConfig
from worker import distributed, resume_state, shutdown
from worker import metrics as worker_metrics
from worker.adapter_archive import PEFT_UNAVAILABLE_FILE, adapter_formats, extract_adapter, pack
from worker.client import ApiClient, ApiUnreachable, AttemptClient, ClaimRefused, LeaseLost

if TYPE_CHECKING:
    from worker.recipe import RecipeInputs

log = logging.getLogger(__name__)


class ApiReporter:
    """Turns recipe progress into job events and resume states, and carries back to the recipe what it must
    do: stop (cancelled, or the lease was lost), or save its state and hand the job back (paused, or the
    worker is shutting down)."""

    def __init__(
        self, attempt: AttemptClient, heartbeat_seconds: float, *, deadline: float | None = None
    ) -> None:
        self._attempt = attempt
        self._heartbeat_seconds = heartbeat_seconds
        self._deadline = deadline  # time.monotonic() after which the attempt gives up (the job time limit)
        self._stop = threading.Event()
        self._lost = threading.Event()  # the API was silent past the lease: stop, and report nothing
        self._pause = threading.Event()
        self._done = threading.Event()
        self._seq = itertools.count(1)  # numbers this attempt's events, so a retried post is stored once
        # The heartbeat's log lines name the job too: the thread runs in a copy of the task's context.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._heartbeat_loop,), name="heartbeat", daemon=True
        )

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        worker_metrics.observe_progress(metrics)
        self._post({"type": "metrics", "message": _describe(metrics), "data": metrics})

    def message(self, text: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self._post({"type": "message", "level": level, "message": text, "data": data})

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict[str, Any]) -> None:
        upload_formats(self._attempt, adapter_dir, step=step)
        self._attempt.publish_checkpoint(step, metrics)

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        archive = state_dir.parent / f"{state_dir.name}.tar"
        try:
            self._attempt.upload_resume_state(archive, step, resume_state.pack(state_dir, archive))
        finally:
            archive.unlink(missing_ok=True)

    def should_stop(self) -> bool:
        return self._stop.is_set() or self.timed_out()

    @property
    def lease_lost(self) -> bool:
        return self._lost.is_set()

    def timed_out(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def hand_back(self) -> str | None:
        if shutdown.requested.is_set():
            return "preempt"
        return "pause" if self._pause.is_set() else None

    def _post(self, event: dict[str, Any]) -> None:
        try:
            self._follow(self._attempt.post_events([{"seq": next(self._seq), **event}]))
        except LeaseLost as exc:
            self._lose(exc)

    def _lose(self, exc: LeaseLost) -> None:
        log.warning("stopping training: %s", exc)
        self._lost.set()
        self._stop.set()

    def _follow(self, reply: LeaseReply) -> None:
        if reply.cancel_requested:
            self._stop.set()
        # A pause withdrawn before the worker saw it clears again.
        (self._pause.set if reply.pause_requested else self._pause.clear)()

    def __enter__(self) -> ApiReporter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        while not self._done.wait(self._heartbeat_seconds):
            try:
                self._follow(self._attempt.heartbeat())
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 409:  # superseded: another attempt owns the job now
                    log.warning("attempt superseded; stopping: %s", exc.response.text)
                    self._stop.set()
                    return
                log.warning("heartbeat failed: %s", exc)
            except LeaseLost as exc:
                self._lose(exc)
                return
            except Exception as exc:  # the lease must outlive any one bad reply
                log.warning("heartbeat failed: %s", exc)


def _describe(metrics: dict[str, Any]) -> str:
    text = f"Step {metrics.get('step')}/{metrics.get('total_steps')}"
    if metrics.get("train_loss") is not None:
        text += f": training loss={metrics['train_loss']:.4f}"
    if metrics.get("eval_loss") is not None:
        text += f", validation loss={metrics['eval_loss']:.4f}"
    return text


def upload_formats(attempt: AttemptClient, adapter_dir: Path, *, step: int | None = None) -> None:
    """Pack and upload every format of an adapter (the final one, or a checkpoint's)."""
    for fmt, directory in adapter_formats(adapter_dir).items():
        archive = pack(directory, adapter_dir.parent / f"{adapter_dir.name}-{fmt}.tar.gz")
        attempt.upload_adapter(archive, fmt, step=step)
        archive.unlink()


def resolve_base_model(settings: Settings, model: str) -> str:
    """This worker's path (or hub id) for a base model id; the tiny model is generated on first use."""
    models = settings.resolved_base_models
    if model not in models:
        raise LookupError(f"Base model '{model}' is not configured on this worker")
    from worker.bootstrap import ensure_tiny_model

    ensure_tiny_model(settings)
    return models[model]


def restore_state(
    claim: ClaimReply, attempt: AttemptClient, reporter: ApiReporter, fingerprint: str, scratch: Path
) -> Path | None:
    """The newest of the job's resume states that downloads whole, matches its sha256 and belongs to this
    job, unpacked; None to start from step 0. A state that fails is skipped with a warning event."""
    for state in claim.resume_states:
        archive, directory = scratch / f"{state.id}.tar", scratch / state.id
        try:
            attempt.download_resume_state(state.id, archive)
            resume_state.unpack(archive, directory, sha256=state.sha256, expected_fingerprint=fingerprint)
        except resume_state.InvalidState as problem:
            shutil.rmtree(directory, ignore_errors=True)
            reporter.message(f"Skipped the resume state of step {state.step}: {problem}", level="warn")
            continue
        finally:
            archive.unlink(missing_ok=True)
        reporter.message(f"Resumed from step {state.step} (attempt {claim.attempt})")
        return directory
    return None


def train(claim: ClaimReply, attempt: AttemptClient, settings: Settings, scratch: Path) -> None:
    """Run one claimed attempt to its end and report the outcome. The lease is renewed from the claim on:
    importing torch and loading the model can take longer than a lease."""
    deadline = time.monotonic() + settings.max_job_seconds
    with ApiReporter(attempt, claim.heartbeat_seconds, deadline=deadline) as reporter:
        result = _run(claim, attempt, reporter, settings, scratch)
    if result is not None:
        worker_metrics.TRAINED_TOKENS.inc(result.trained_tokens)
    if reporter.lease_lost:
        raise LeaseLost("the API stayed silent for longer than the lease; the job goes to a new attempt")
    if result is None:  # told to stop before training began: nothing trained, nothing lost
        attempt.complete("requeued", reason="the worker is shutting down")
    elif result.handed_back == "pause":
        attempt.complete("paused", trained_tokens=result.trained_tokens)
    elif result.handed_back == "preempt":
        attempt.complete(
            "requeued", trained_tokens=result.trained_tokens, reason="the worker is shutting down"
        )
    elif reporter.timed_out():
        limit = settings.max_job_seconds
        attempt.complete("failed", error=f"The attempt ran past the job time limit ({limit:.0f} s)")
    elif result.cancelled:
        attempt.complete("cancelled", trained_tokens=result.trained_tokens)
    else:
        upload_formats(attempt, result.adapter_dir)
        reason_file = result.adapter_dir / PEFT_UNAVAILABLE_FILE
        attempt.complete(
            "succeeded",
            trained_tokens=result.trained_tokens,
            shipped_step=result.best_step,
            peft_unavailable_reason=reason_file.read_text().strip() if reason_file.exists() else None,
        )


def _run(claim: ClaimReply, attempt: AttemptClient, reporter: ApiReporter, settings: Settings, scratch: Path):
    """Fetch the inputs and the newest usable resume state, else the adapter the job continues from (if any),
    then train; None if shutdown came first."""
    from worker.recipe import state_fingerprint  # torch loads only when a job runs

    num_processes = TrainingConfig(**claim.training_config).num_processes
    distributed.check_devices(num_processes, settings.worker_devices)  # before anything is downloaded
    training_file = attempt.download_file(claim.training_file, scratch / "train.jsonl")
    validation_file = (
        attempt.download_file(claim.validation_file, scratch / "validation.jsonl")
        if claim.validation_file
        else None
    )
    inputs = recipe_inputs(claim, settings, training_file, validation_file, scratch)
    if shutdown.requested.is_set():
        return None
    if claim.resume_states:
        inputs.resume_from = restore_state(claim, attempt, reporter, state_fingerprint(inputs), scratch)
    # A resume state holds newer weights, but a DPO job's reference is the adapter it continued from.
    if inputs.training_config.init_from and (inputs.resume_from is None or inputs.dpo is not None):
        inputs.init_from = fetch_init_adapter(
            attempt, inputs.training_config.init_from, inputs.peft_config.backend, scratch
        )
    return distributed.run(inputs, reporter, worker_devices=settings.worker_devices)


class SourceModelGone(RuntimeError):
    """The model a job continues from (training_config.init_from) was deleted before the job saved a state."""


def fetch_init_adapter(attempt: AttemptClient, name: str, backend: Format, scratch: Path) -> Path:
    """The adapter of training_config.init_from (`name`), in the format of the job's `backend`, downloaded
    through the attempt and unpacked by the checked reader (`worker.adapter_archive.extract_adapter`:
    safetensors only, no path leaves it, bounded)."""
    archive = scratch / "init_from.tar.gz"
    try:
        attempt.download_init_adapter(archive)
    except httpx.HTTPStatusError as refused:
        if refused.response.status_code != 404:
            raise
        raise SourceModelGone(
            f"the model this job continues from ({name}) was deleted after the job was created; create the "
            "job again from an existing model"
        ) from None
    try:
        return extract_adapter(archive, scratch / "init_from", backend)
    finally:
        archive.unlink(missing_ok=True)


def recipe_inputs(
    claim: ClaimReply, settings: Settings, training_file: Path, validation_file: Path | None, scratch: Path
) -> RecipeInputs:
    """What the recipe needs to train a claimed job on this worker."""
    from worker import trackers
    from worker.recipe import RecipeInputs

    training_config = TrainingConfig(**claim.training_config)
    return RecipeInputs(
        base_model=resolve_base_model(settings, claim.model),
        training_file=training_file,
        validation_file=validation_file,
        training_config=training_config,
        peft_config=PeftConfig(**claim.peft_config),
        output_dir=scratch / "output",
        resume_state_seconds=settings.resume_state_seconds,
        device=settings.device,
        tracking=trackers.for_job(claim.job_id, claim.suffix, training_config, settings),
        dpo=DpoConfig.of_method(claim.method),
    )


def report_failure(attempt: AttemptClient, message: str) -> None:
    try:
        attempt.complete("failed", error=message)
    except httpx.HTTPError as exc:  # superseded or already final: the API keeps the newer truth
        log.warning("could not report the failure: %s", exc)


def run_training_job(job_id: str, settings: Settings) -> str:
    """The Celery task's body. Any exception becomes a failed job with a readable message."""
    worker_metrics.JOBS_RUNNING.inc()
    outcome = "failed"
    try:
        outcome = _run_training_job(job_id, settings)
        return outcome
    finally:
        worker_metrics.JOBS_RUNNING.dec()
        worker_metrics.ATTEMPTS.labels(outcome).inc()


def _run_training_job(job_id: str, settings: Settings) -> str:
    client = ApiClient(settings.api_url, settings.resolved_worker_token)
    try:
        try:
            claim = client.claim(job_id)
        except ClaimRefused as refusal:
            log.info("skipping %s: %s", job_id, refusal)
            return "skipped"
        except ApiUnreachable as down:  # the API sends the job's message again once it is back
            log.warning("could not claim %s: %s", job_id, down)
            return "unreachable"
        log_setup.attempt.set(claim.attempt)
        attempt = client.attempt(claim)
        work_dir = settings.data_dir / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{job_id}-", dir=work_dir) as scratch:
            try:
                train(claim, attempt, settings, Path(scratch))
            except LeaseLost as lost:  # nothing to report to: the API re-queues the job when it is back
                log.warning("job %s abandoned: %s", job_id, lost)
                return "lost"
            except Exception as exc:
                log.exception("job %s failed", job_id)
                report_failure(attempt, f"{type(exc).__name__}: {exc}")
                return "failed"
        return "done"
    finally:
        client.close()
