"""Checkpoints a worker stores during training: listed with their metrics, callable, downloadable, pruned."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.errors import Conflict
from app.jobs import artifacts
from app.jobs.schemas import JobCheckpointList
from app.models import Checkpoint, Job
from app.models.base import new_id
from app.pagination import paginate
from app.repositories import artifacts as stored


def publish(session: Session, job: Job, step: int, metrics: dict[str, Any]) -> Checkpoint:
    """List the checkpoint of `step` once its archive is stored (idempotent: a retry updates the metrics)."""
    if not stored.formats(session, job.id, artifacts.checkpoint_scope(step)):
        raise Conflict(f"Upload the adapter of step {step} before publishing it", code="adapter_missing")
    checkpoint = stored.checkpoint_at(session, job.id, step)
    if checkpoint is None:
        checkpoint = Checkpoint(
            id=new_id("ftckpt"),
            job_id=job.id,
            step_number=step,
            fine_tuned_model_checkpoint=artifacts.checkpoint_model_name(job, step),
            metrics=metrics,
        )
        stored.add_checkpoint(session, checkpoint)
    else:
        checkpoint.metrics = metrics
    return checkpoint


def prune(session: Session, job: Job) -> list[str]:
    """Apply save_total_limit: drop the oldest checkpoints (never the best one when it is kept for
    load_best_model_at_end). Returns storage keys to delete once the transaction has committed."""
    limit = job.training_config.get("save_total_limit")
    if not limit:
        return []
    checkpoints = stored.checkpoints_by_step(session, job.id)
    keep = set(c.id for c in checkpoints[-limit:])
    if job.training_config.get("load_best_model_at_end"):
        scored = [c for c in checkpoints if c.metrics.get("valid_loss") is not None]
        if scored:
            keep.add(min(scored, key=lambda c: c.metrics["valid_loss"]).id)
    doomed_keys: list[str] = []
    for checkpoint in checkpoints:
        if checkpoint.id not in keep:
            doomed_keys += stored.delete_scope(
                session, job.id, artifacts.checkpoint_scope(checkpoint.step_number)
            )
            stored.delete_checkpoint(session, checkpoint)
    return doomed_keys


def list_page(session: Session, job: Job, *, limit: int, after: str | None) -> JobCheckpointList:
    """The job's checkpoints, newest first."""
    return paginate(
        session,
        stored.checkpoint_query(job.id),
        limit=limit,
        after=after,
        newest_first=True,
        into=JobCheckpointList,
    )
