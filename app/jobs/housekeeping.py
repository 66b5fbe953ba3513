"""The API's background loop. Every round it reaps expired leases (app.jobs.leases), sends job messages
that were lost or not sent yet (app.jobs.outbox), and deletes the resume states of jobs that ended. Every
step is its own unit of work: one that fails leaves the others done, and the next round tries again."""

from __future__ import annotations

import logging
import threading
from functools import partial

from app.config import Settings
from app.db import after_commit, session_scope
from app.jobs import leases, resume_states
from app.jobs.outbox import JobMessages, resend_lost, send_pending
from app.storage import open_storage

log = logging.getLogger(__name__)
# The request that queued a job sends its message itself; the loop only picks up messages this old.
SEND_GRACE_SECONDS = 5


class Housekeeping:
    """A daemon thread in the API process running `run_once` every `housekeeping_seconds`."""

    def __init__(self, settings: Settings, messages: JobMessages) -> None:
        self.settings = settings
        self.messages = messages
        self.storage = open_storage(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self) -> None:
        """One round: each step on its own, so that one that fails (a broker down, a row that cannot be
        read) keeps none of the others from running."""
        url, celery = self.settings.resolved_database_url, self.messages.celery
        for step in (
            lambda: leases.reap_expired_leases(url),
            lambda: resend_lost(url, celery, min_age=self.settings.redeliver_seconds),
            lambda: send_pending(url, celery, min_age=SEND_GRACE_SECONDS),
            self.purge_resume_states,
        ):
            try:
                step()
            except Exception:
                log.exception("housekeeping step failed; the next round tries again")

    def purge_resume_states(self) -> None:
        with session_scope(self.settings.resolved_database_url) as session:
            for key in resume_states.purge_finished(session):  # a row never points at a deleted file
                after_commit(session, partial(self.storage.delete, key))

    def _run(self) -> None:
        while not self._stop.wait(self.settings.housekeeping_seconds):
            self.run_once()
