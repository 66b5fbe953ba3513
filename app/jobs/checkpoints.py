"""Checkpoints a worker stores during training: listed with their metrics, callable, downloadable, pruned."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.jobs import artifacts
from app.models import Checkpoint, Job
from app.models.base import new_id


def publish(session: Session, job: Job, step: int, metrics: dict[str, Any]) -> Checkpoint:
    """List the checkpoint of `step` once its archive is stored (idempotent: a retry updates the metrics)."""
    if not artifacts.formats_of(session, job.id, artifacts.checkpoint_scope(step)):
        raise Conflict(f"Upload the adapter of step {step} before publishing it", code="adapter_missing")
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step)
    )
    if checkpoint is None:
        checkpoint = Checkpoint(
            id=new_id("ftckpt"),
            job_id=job.id,
            step_number=step,
            fine_tuned_model_checkpoint=artifacts.checkpoint_model_name(job, step),
            metrics=metrics,
        )
        session.add(checkpoint)
    else:
        checkpoint.metrics = metrics
    session.flush()
    return checkpoint


def prune(session: Session, job: Job) -> list[str]:
    """Apply save_total_limit: drop the oldest checkpoints (never the best one when it is kept for
    load_best_model_at_end). Returns storage keys to delete once the transaction has committed."""
    limit = job.training_config.get("save_total_limit")
    if not limit:
        return []
    checkpoints = list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step_number)
        )
    )
    keep = set(c.id for c in checkpoints[-limit:])
    if job.training_config.get("load_best_model_at_end"):
        scored = [c for c in checkpoints if c.metrics.get("valid_loss") is not None]
        if scored:
            keep.add(min(scored, key=lambda c: c.metrics["valid_loss"]).id)
    doomed_keys: list[str] = []
    for checkpoint in checkpoints:
        if checkpoint.id not in keep:
            doomed_keys += artifacts.delete_scope(
                session, job.id, artifacts.checkpoint_scope(checkpoint.step_number)
            )
            session.delete(checkpoint)
    return doomed_keys


def by_model_name(session: Session, tenant_id: str, name: str) -> tuple[Checkpoint, Job] | None:
    """The tenant's checkpoint called `name` (ft:…:ckpt-step-N), with its job."""
    row = session.execute(
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.fine_tuned_model_checkpoint == name, Job.tenant_id == tenant_id)
    ).first()
    return (row[0], row[1]) if row else None


def list_query(job_id: str):
    return select(Checkpoint).where(Checkpoint.job_id == job_id)


def render(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuning_job_id": checkpoint.job_id,
        "step_number": checkpoint.step_number,
        "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
        "metrics": checkpoint.metrics,
    }
