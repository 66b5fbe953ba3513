"""The job outbox: Celery messages leave only after the job row has committed, and are re-sent if lost.

The same background loop (OutboxRelay) also reaps expired leases (app.jobs.leases: a job whose worker went
silent loses that attempt), deletes the resume states of jobs that have ended, and sends
again the message of a queued job that the broker lost (a Redis restart keeps nothing): when the training
queue is empty but jobs have been queued for longer than `redeliver_seconds`, their messages are gone.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.broker import TRAINING_QUEUE, enqueue_training, make_celery
from app.config import Settings
from app.db import session_scope
from app.jobs import leases, resume_states
from app.models import Job, JobStatus, Outbox
from app.models.base import now
from app.storage import Storage

log = logging.getLogger(__name__)
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


def queued_messages(celery: Celery) -> int:
    """How many messages wait in the training queue (a running job's message is not counted)."""
    with celery.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue=TRAINING_QUEUE).message_count


def resend_lost(session: Session, celery: Celery, *, min_age: float) -> int:
    """Queue a fresh message for each job queued longer than `min_age` seconds since its last message,
    when the broker holds none: those messages were lost. A copy that was not lost after all is harmless:
    only a queued job can be claimed, so the second copy is refused."""
    last_sent = (
        select(Outbox.job_id, func.max(Outbox.sent_at).label("sent_at"))
        .group_by(Outbox.job_id)
        .having(func.count() == func.count(Outbox.sent_at))  # no message of the job is still unsent
        .subquery()
    )
    stale = list(
        session.scalars(
            select(Job.id)
            .join(last_sent, last_sent.c.job_id == Job.id)
            .where(Job.status == JobStatus.QUEUED, last_sent.c.sent_at <= now() - min_age)
        )
    )
    if not stale or queued_messages(celery) > 0:
        return 0
    for job_id in stale:
        session.add(Outbox(job_id=job_id))
    log.warning("the broker holds no message for %d queued job(s); sending them again", len(stale))
    session.commit()
    return len(stale)


class OutboxRelay:
    """A daemon thread in the API process that, every round, reaps expired leases (app.jobs.leases), sends
    lost and pending outbox messages, and purges the resume states of jobs that ended."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)
        self.storage = Storage(settings.storage_dir)
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
            leases.reap_expired_leases(session)
            resend_lost(session, self.celery, min_age=self.settings.redeliver_seconds)
            send_pending(session, self.celery, min_age=RELAY_GRACE_SECONDS)
            doomed = resume_states.purge_finished(session)
        for key in doomed:  # after the commit: a row never points at a deleted file
            self.storage.delete(key)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.outbox_relay_seconds):
            try:
                self.run_once()
            except Exception:
                log.exception("outbox relay round failed")
