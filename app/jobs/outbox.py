"""The job outbox: Celery messages leave only after the job row has committed, and are re-sent if lost.

The same background loop recovers jobs whose worker went silent (its lease expired): they are queued
again as a new attempt, up to MAX_ATTEMPTS, then failed with the reason.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.broker import enqueue_training, make_celery
from app.config import Settings
from app.db import session_scope
from app.jobs.service import add_event, finish_job
from app.models import Job, JobStatus, Outbox
from app.models.base import now

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
# The request that created a job sends its message itself; the relay only picks up rows this old.
RELAY_GRACE_SECONDS = 5


def send_pending(session: Session, celery: Celery, *, job_id: str | None = None, min_age: int = 0) -> int:
    """Send unsent outbox rows (of one job, or all older than `min_age` seconds); returns how many."""
    query = select(Outbox).where(Outbox.sent_at.is_(None), Outbox.created_at <= now() - min_age)
    if job_id is not None:
        query = query.where(Outbox.job_id == job_id)
    rows = list(session.scalars(query.order_by(Outbox.seq)))
    for row in rows:
        enqueue_training(celery, row.job_id)
        row.sent_at = now()
        session.commit()  # one by one: a broker failure midway keeps the rest for the next round
    return len(rows)


def recover_expired_leases(session: Session) -> int:
    """Re-queue (or fail) running jobs whose worker stopped heartbeating."""
    expired = list(
        session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now()))
    )
    for job in expired:
        if job.cancel_requested:
            finish_job(session, job, JobStatus.CANCELLED, "Job cancelled; its worker stopped responding")
        elif job.attempt >= MAX_ATTEMPTS:
            finish_job(
                session,
                job,
                JobStatus.FAILED,
                f"Worker stopped responding on attempt {job.attempt} of {MAX_ATTEMPTS}; giving up",
                error={"code": "worker_lost", "message": "The worker stopped responding", "param": None},
            )
        else:
            job.status = JobStatus.QUEUED
            job.lease_expires_at = None
            session.add(Outbox(job_id=job.id))
            add_event(
                session,
                job.id,
                f"Worker stopped responding; retrying as attempt {job.attempt + 1}",
                level="warn",
            )
        session.commit()
    return len(expired)


class OutboxRelay:
    """A daemon thread in the API process that runs the outbox and lease checks periodically."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def send_now(self, job_id: str) -> None:
        """Send a just-committed job's message; on a broker error the relay retries it later."""
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                send_pending(session, self.celery, job_id=job_id)
        except Exception:
            log.exception("could not send job %s now; the relay will retry", job_id)

    def check_broker(self) -> None:
        """Raise unless the broker accepts a connection (for /readyz)."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    def run_once(self) -> None:
        with session_scope(self.settings.resolved_database_url) as session:
            recover_expired_leases(session)
            send_pending(session, self.celery, min_age=RELAY_GRACE_SECONDS)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.outbox_relay_seconds):
            try:
                self.run_once()
            except Exception:
                log.exception("outbox relay round failed")
