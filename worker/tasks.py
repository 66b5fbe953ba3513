"""The training task: claim a job through the API, run the recipe, report progress and the adapter back."""

from __future__ import annotations

import logging
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.specs import PeftConfig, TrainingConfig
from worker.client import ApiClient, AttemptClient, Claim, ClaimRefused

log = logging.getLogger(__name__)


class ApiReporter:
    """Turns recipe progress into job events and carries cancellation (or a lost lease) back to it."""

    def __init__(self, attempt: AttemptClient, heartbeat_seconds: float) -> None:
        self._attempt = attempt
        self._heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        if self._attempt.post_events([{"type": "metrics", "message": _describe(metrics), "data": metrics}]):
            self._stop.set()

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict[str, Any]) -> None:
        upload_formats(self._attempt, adapter_dir, step=step)
        self._attempt.publish_checkpoint(step, metrics)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> ApiReporter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        while not self._done.wait(self._heartbeat_seconds):
            try:
                if self._attempt.heartbeat():
                    self._stop.set()
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 409:  # superseded: another attempt owns the job now
                    log.warning("attempt superseded; stopping: %s", exc.response.text)
                    self._stop.set()
                    return
                log.warning("heartbeat failed: %s", exc)
            except httpx.HTTPError as exc:
                log.warning("heartbeat failed: %s", exc)


def _describe(metrics: dict[str, Any]) -> str:
    text = f"Step {metrics.get('step')}/{metrics.get('total_steps')}"
    if metrics.get("train_loss") is not None:
        text += f": training loss={metrics['train_loss']:.4f}"
    if metrics.get("eval_loss") is not None:
        text += f", validation loss={metrics['eval_loss']:.4f}"
    return text


PEFT_UNAVAILABLE = "PEFT_UNAVAILABLE.txt"
LORALIB_DIR = "loralib"


def pack(directory: Path, archive: Path) -> Path:
    """A .tar.gz of a directory's files at its root (no sub-folders)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name != PEFT_UNAVAILABLE:
                tar.add(path, arcname=path.name)
    return archive


def adapter_formats(adapter_dir: Path) -> dict[str, Path]:
    """The download formats an adapter directory holds: PEFT files at its root, loralib in `loralib/`."""
    formats = {}
    if (adapter_dir / "adapter_config.json").exists():
        formats["peft"] = adapter_dir
    if (adapter_dir / LORALIB_DIR).is_dir():
        formats["loralib"] = adapter_dir / LORALIB_DIR
    return formats


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


def train(claim: Claim, attempt: AttemptClient, settings: Settings, scratch: Path) -> None:
    """Run one claimed attempt to its end and report the outcome."""
    from worker.recipe import RecipeInputs, run_recipe  # torch loads only when a job runs

    training_file = attempt.download_file(claim.training_file, scratch / "train.jsonl")
    validation_file = (
        attempt.download_file(claim.validation_file, scratch / "validation.jsonl")
        if claim.validation_file
        else None
    )
    inputs = RecipeInputs(
        base_model=resolve_base_model(settings, claim.model),
        training_file=training_file,
        validation_file=validation_file,
        training_config=TrainingConfig(**claim.training_config),
        peft_config=PeftConfig(**claim.peft_config),
        output_dir=scratch / "output",
    )
    with ApiReporter(attempt, claim.heartbeat_seconds) as reporter:
        result = run_recipe(inputs, reporter)
    if result.cancelled:
        attempt.complete("cancelled", trained_tokens=result.trained_tokens)
        return
    upload_formats(attempt, result.adapter_dir)
    reason_file = result.adapter_dir / PEFT_UNAVAILABLE
    attempt.complete(
        "succeeded",
        trained_tokens=result.trained_tokens,
        shipped_step=result.best_step,
        peft_unavailable_reason=reason_file.read_text().strip() if reason_file.exists() else None,
    )


def report_failure(attempt: AttemptClient, message: str) -> None:
    try:
        attempt.complete("failed", error=message)
    except httpx.HTTPError as exc:  # superseded or already final: the API keeps the newer truth
        log.warning("could not report the failure: %s", exc)


def run_training_job(job_id: str, settings: Settings) -> str:
    """The Celery task's body. Any exception becomes a failed job with a readable message."""
    client = ApiClient(settings.api_url, settings.resolved_worker_token)
    try:
        try:
            claim = client.claim(job_id)
        except ClaimRefused as refusal:
            log.info("skipping %s: %s", job_id, refusal)
            return "skipped"
        attempt = client.attempt(claim)
        work_dir = settings.data_dir / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{job_id}-", dir=work_dir) as scratch:
            try:
                train(claim, attempt, settings, Path(scratch))
            except Exception as exc:
                log.exception("job %s failed", job_id)
                report_failure(attempt, f"{type(exc).__name__}: {exc}")
                return "failed"
        return "done"
    finally:
        client.close()
