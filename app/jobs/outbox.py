"""Job messages: a Celery message leaves only after its job's row has committed, and is sent again if the
broker lost it.

A job's message is an outbox row written in the transaction that queues the job; the request sends it
once that transaction has committed (`JobMessages.send_now`), and the housekeeping loop sends whatever a
failed send left behind, and a fresh message for a queued job whose message the broker lost (a Redis
restart keeps nothing): when the training queue is empty but jobs have been queued for longer than
`redeliver_seconds`, their messages are gone.
"""

from __future__ import annotations

import logging

from celery import Celery

from app.broker import TRAINING_QUEUE, enqueue_training, make_celery
from app.config import Settings
from app.db import session_scope
from app.repositories import jobs

log = logging.getLogger(__name__)


def send_pending(database_url: str, celery: Celery, *, job_id: str | None = None, min_age: float = 0) -> int:
    """Send unsent messages (of one job, or all older than `min_age` seconds), each in its own unit of
    work, so a broker failure midway keeps the rest for the next round. Returns how many were sent."""
    with session_scope(database_url) as session:
        pending = jobs.unsent_message_ids(session, job_id=job_id, min_age=min_age)
    sent = 0
    for seq in pending:
        with session_scope(database_url) as session:
            if (message_job := jobs.claim_unsent_message(session, seq)) is not None:
                enqueue_training(celery, message_job)  # a failure rolls the claim back
                sent += 1
    return sent


def queued_messages(celery: Celery) -> int:
    """How many messages wait in the training queue (a running job's message is not counted)."""
    with celery.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue=TRAINING_QUEUE).message_count


def resend_lost(database_url: str, celery: Celery, *, min_age: float) -> int:
    """Queue a fresh message for each job queued longer than `min_age` seconds since its last message,
    when the broker holds none: those messages were lost. A copy that was not lost after all is harmless:
    only a queued job can be claimed, so the second copy is refused."""
    with session_scope(database_url) as session:
        stale = jobs.queued_jobs_last_sent_before(session, min_age)
        if not stale or queued_messages(celery) > 0:
            return 0
        for job_id in stale:
            jobs.add_message(session, job_id)
        log.warning("the broker holds no message for %d queued job(s); sending them again", len(stale))
    return len(stale)


class JobMessages:
    """The API's sender of job messages."""

    def __init__(self, settings: Settings) -> None:
        self.database_url = settings.resolved_database_url
        self.celery = make_celery(settings)

    def send_now(self, job_id: str) -> None:
        """Send a just-committed job's message; on a broker error the housekeeping loop retries it later."""
        try:
            send_pending(self.database_url, self.celery, job_id=job_id)
        except Exception:
            log.exception("could not send job %s now; the housekeeping loop will retry", job_id)

    def check_broker(self) -> None:
        """Raise unless the broker accepts a connection (for /readyz)."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
