"""Job states: the legal transitions, listed once in TABLE, and the one function that makes them.

    transition       from               to          only while                           also writes
    claim            queued             running
    pause_queued     queued             paused
    request_pause    running            running     no pause and no cancel requested     pause_requested
    withdraw_pause   running            running     a pause requested                    pause_requested=false
    resume           paused             queued
    cancel_queued    queued             cancelled                                        cancel_requested
    cancel_paused    paused             cancelled                                        cancel_requested
    request_cancel   running            running     no cancel requested                  cancel_requested
    succeed          running            succeeded
    fail             running            failed
    cancel           running            cancelled
    park_paused      running            paused
    requeue          running            queued
    lose_lease       running            running     the lease expired                    lost_attempts + 1

Leaving `running` clears the lease and any pause request (nothing is left to pause); landing in a final
status stamps `finished_at`; landing in a new status queues its webhooks (app.webhooks.events.announce). A
job is created `queued`; succeeded, failed and cancelled have no way out.

Every transition is one guarded `UPDATE jobs … WHERE id = … AND status IN (from) AND <only while>`: the
UPDATE holds the row's lock (on SQLite the database's) until commit, so of concurrent attempts at the same
transition exactly one happens and the others see the row as it is now.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app.models import Job, JobStatus
from app.models.base import now
from app.repositories import jobs
from app.webhooks.events import announce


class Transition(enum.StrEnum):
    CLAIM = "claim"
    PAUSE_QUEUED = "pause_queued"
    REQUEST_PAUSE = "request_pause"
    WITHDRAW_PAUSE = "withdraw_pause"
    RESUME = "resume"
    CANCEL_QUEUED = "cancel_queued"
    CANCEL_PAUSED = "cancel_paused"
    REQUEST_CANCEL = "request_cancel"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"
    PARK_PAUSED = "park_paused"
    REQUEUE = "requeue"
    LOSE_LEASE = "lose_lease"


@dataclass(frozen=True)
class Rule:
    """One row of the table: the statuses a transition leaves from, the one it lands in, the flag columns
    that must hold (`requires`), whether the lease must have expired, the columns it also writes and the
    counters it adds one to."""

    sources: frozenset[JobStatus]
    target: JobStatus
    requires: Mapping[str, bool] = field(default_factory=dict)
    sets: Mapping[str, Any] = field(default_factory=dict)
    lease_expired: bool = False
    counts: frozenset[str] = frozenset()

    def writes(self) -> dict[str, Any]:
        values: dict[str, Any] = {"status": self.target}
        if self.target != JobStatus.RUNNING:
            values.update(lease_expires_at=None, pause_requested=False)
        if self.target.is_final:
            values["finished_at"] = now()
        return {**values, **self.sets}


QUEUED, RUNNING, PAUSED = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED
NOTHING_REQUESTED = {"pause_requested": False, "cancel_requested": False}

TABLE: Mapping[Transition, Rule] = {
    Transition.CLAIM: Rule(frozenset({QUEUED}), RUNNING),
    Transition.PAUSE_QUEUED: Rule(frozenset({QUEUED}), PAUSED),
    Transition.REQUEST_PAUSE: Rule(
        frozenset({RUNNING}), RUNNING, requires=NOTHING_REQUESTED, sets={"pause_requested": True}
    ),
    Transition.WITHDRAW_PAUSE: Rule(
        frozenset({RUNNING}), RUNNING, requires={"pause_requested": True}, sets={"pause_requested": False}
    ),
    Transition.RESUME: Rule(frozenset({PAUSED}), QUEUED),
    Transition.CANCEL_QUEUED: Rule(frozenset({QUEUED}), JobStatus.CANCELLED, sets={"cancel_requested": True}),
    Transition.CANCEL_PAUSED: Rule(frozenset({PAUSED}), JobStatus.CANCELLED, sets={"cancel_requested": True}),
    Transition.REQUEST_CANCEL: Rule(
        frozenset({RUNNING}), RUNNING, requires={"cancel_requested": False}, sets={"cancel_requested": True}
    ),
    Transition.SUCCEED: Rule(frozenset({RUNNING}), JobStatus.SUCCEEDED),
    Transition.FAIL: Rule(frozenset({RUNNING}), JobStatus.FAILED),
    Transition.CANCEL: Rule(frozenset({RUNNING}), JobStatus.CANCELLED),
    Transition.PARK_PAUSED: Rule(frozenset({RUNNING}), PAUSED),
    Transition.REQUEUE: Rule(frozenset({RUNNING}), QUEUED),
    Transition.LOSE_LEASE: Rule(
        frozenset({RUNNING}),
        RUNNING,
        sets={"lease_expires_at": None},
        counts=frozenset({"lost_attempts"}),
        lease_expired=True,
    ),
}

# The transition that ends a running attempt in each final status.
FINISH = {
    JobStatus.SUCCEEDED: Transition.SUCCEED,
    JobStatus.FAILED: Transition.FAIL,
    JobStatus.CANCELLED: Transition.CANCEL,
}


class IllegalTransition(Exception):
    """A transition the table does not allow from the job's current status. Callers turn it into the HTTP
    answer that fits (409 job_not_pausable, job_not_claimable, …)."""

    def __init__(self, job_id: str, status: str, *names: Transition) -> None:
        self.job_id, self.status, self.transitions = job_id, JobStatus(status), names
        allowed = ", ".join(sorted(set().union(*(TABLE[name].sources for name in names))))
        tried = " or ".join(f"'{name}'" for name in names)
        super().__init__(f"Job {job_id} is {status}; {tried} is only allowed from {allowed}")


def allowed_from(status: JobStatus) -> list[Transition]:
    """The transitions the table allows from `status`."""
    return [name for name, rule in TABLE.items() if status in rule.sources]


def transition(
    session: Session, job: Job, name: Transition, *, of_attempt: int | None = None, **values: Any
) -> bool:
    """Make transition `name` on the job's row, with the table's writes plus `values`, if the row is in one
    of its `from` statuses, its guards hold and (given `of_attempt`) it is still on that attempt; then
    refresh `job`. True if it happened; False if the job's status allows it but a guard refused it (already
    requested, lease renewed, a newer attempt, …). IllegalTransition if the job's current status does not
    allow it at all."""
    rule = TABLE[name]
    done = jobs.guarded_update(
        session,
        job,
        jobs.Guard(rule.sources, rule.requires, lease_expired=rule.lease_expired, attempt=of_attempt),
        {**rule.writes(), **values},
        increments=rule.counts,
    )
    if not done and job.status not in rule.sources:
        raise IllegalTransition(job.id, job.status, name)
    if done and rule.target not in rule.sources:
        announce(session, job)  # the webhooks of the status it landed in, in this transaction
    return done


def first_of(session: Session, job: Job, *names: Transition) -> Transition | None:
    """Make the first of `names` the job's current status allows: the one that happened, or None when the
    status allows one but its guards refused it. IllegalTransition when the status allows none of them. A row
    that moved meanwhile to a status one of them allows is tried again."""
    while True:
        for name in names:
            try:
                return name if transition(session, job, name) else None
            except IllegalTransition:
                continue
        if not any(JobStatus(job.status) in TABLE[name].sources for name in names):
            raise IllegalTransition(job.id, job.status, *names)
