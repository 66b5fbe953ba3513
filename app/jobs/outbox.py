"""Job messages: a Celery message leaves only after its job's row has committed, and is sent again if the
broker lost it.

A job's message is an outbox row written in the transaction that queues the job; the request sends it
once that transaction has committed (`JobMessages.send_now`), and the housekeeping loop sends whatever a
failed send left behind, and a fresh message for a queued job whose message the broker lost (a Redis
restart keeps nothing): when a job's queue (app.broker.QueueRoutes) is empty but its jobs have been queued
for longer than `redeliver_seconds`, their messages are gone.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from celery import Celery

from app.broker import TRAINING_QUEUE, enqueue_training, make_celery, queue_routes
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
                job = jobs.get(session, message_job)
                assert job is not None  # an outbox row is deleted with its job
                enqueue_training(celery, job.id, job.model)  # a failure rolls the claim back
                sent += 1
    return sent


def queued_messages(celery: Celery, queue: str = TRAINING_QUEUE) -> int:
    """How many messages wait in `queue` (a running job's message is not counted)."""
    with celery.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue=queue).message_count


def resend_lost(database_url: str, celery: Celery, *, min_age: float) -> int:
    """Queue a fresh message for each job queued longer than `min_age` seconds since its last message,
    when its queue holds none: those messages were lost. A copy that was not lost after all is harmless:
    only a queued job can be claimed, so the second copy is refused."""
    routes = queue_routes(celery)
    with session_scope(database_url) as session:
        stale: defaultdict[str, list[str]] = defaultdict(list)
        for job_id in jobs.queued_jobs_last_sent_before(session, min_age):
            job = jobs.get(session, job_id)
            assert job is not None  # the query just found it
            stale[routes.queue(job.model)].append(job_id)
        lost = [
            job_id for queue, ids in stale.items() if queued_messages(celery, queue) == 0 for job_id in ids
        ]
        for job_id in lost:
            jobs.add_message(session, job_id)
        if lost:
            log.warning("the broker holds no message for %d queued job(s); sending them again", len(lost))
    return len(lost)


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
