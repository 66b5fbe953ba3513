"""A queued job whose broker message was lost (a Redis restart keeps nothing) is sent again by the API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.broker import TRAINING_QUEUE, make_celery
from app.db import session_scope
from app.jobs.outbox import queued_messages, resend_lost, send_pending
from app.main import create_app
from app.models import Outbox
from tests.utils import CHAT_LINES, upload_file


@pytest.fixture
def own_broker(settings):
    """Settings whose broker is a filesystem queue of this test's own (the memory transport is shared by
    every app in the process)."""
    return settings.model_copy(update={"broker_url": None})


def unsent(session, job_id: str) -> int:
    return session.scalar(select(func.count()).where(Outbox.job_id == job_id, Outbox.sent_at.is_(None)))


def test_a_lost_message_is_sent_again_and_a_waiting_one_is_not(own_broker, auth):
    celery = make_celery(own_broker)
    with TestClient(create_app(own_broker)) as client:
        file_id = upload_file(client, auth, CHAT_LINES)
        job_id = client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
        ).json()["id"]
    url = own_broker.resolved_database_url
    with session_scope(url) as session:  # the job's message went out an hour ago
        session.execute(update(Outbox).where(Outbox.job_id == job_id).values(sent_at=Outbox.sent_at - 3600))
    assert queued_messages(celery) == 1

    resend_lost(url, celery, min_age=60)  # still waiting in the queue: not lost
    with session_scope(url) as session:
        assert unsent(session, job_id) == 0
    with celery.connection_for_write() as connection:  # the broker restarts and forgets it
        connection.default_channel.queue_purge(TRAINING_QUEUE)
    assert resend_lost(url, celery, min_age=60) >= 1
    with session_scope(url) as session:
        assert unsent(session, job_id) == 1
    assert send_pending(url, celery, job_id=job_id) == 1
    assert queued_messages(celery) >= 1
    resend_lost(url, celery, min_age=60)  # sent just now: not lost
    with session_scope(url) as session:
        assert unsent(session, job_id) == 0
