"""The job state table (app.jobs.states), walked on a real database row: every transition from every status
either happens and lands where the table says, or is refused as illegal; guards refuse without a change;
and of two sessions racing the same transition exactly one makes it."""

from __future__ import annotations

import secrets
import threading
from typing import Any

import pytest
from sqlalchemy import select

from app.db import get_sessionmaker, session_scope
from app.jobs import states
from app.jobs.states import TABLE, IllegalTransition, Transition
from app.models import Job, JobStatus, Tenant
from app.models.base import new_id, now

COLUMNS = (
    "status",
    "cancel_requested",
    "pause_requested",
    "lease_expires_at",
    "lost_attempts",
    "finished_at",
)


def make_job(database_url: str, status: JobStatus, **fields: Any) -> str:
    """A job row in `status` (no files or outbox: the state machine only looks at the row)."""
    with session_scope(database_url) as session:
        tenant = Tenant(id=new_id("tenant"), name=f"states-{secrets.token_hex(6)}")
        session.add(tenant)
        session.flush()
        job = Job(
            id=new_id("ftjob"),
            tenant_id=tenant.id,
            model="tiny-phi3",
            training_file="file-x",
            seed=1,
            hyperparameters={},
            training_config={},
            peft_config={},
            status=status,
            **{"lease_expires_at": now() - 60, "cancel_requested": False, "pause_requested": False, **fields},
        )
        session.add(job)
        return job.id


def row(database_url: str, job_id: str) -> dict[str, Any]:
    with session_scope(database_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        return {column: getattr(job, column) for column in COLUMNS}


def attempt(database_url: str, job_id: str, name: Transition, of_attempt: int | None = None) -> bool:
    with session_scope(database_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        return states.transition(session, job, name, of_attempt=of_attempt)


def test_the_table_is_sound():
    for name, rule in TABLE.items():
        assert rule.sources, name
        assert not any(status.is_final for status in rule.sources), f"{name} leaves a final status"
    for status in JobStatus:
        assert (states.allowed_from(status) == []) == status.is_final, status
    landed = {rule.target for rule in TABLE.values()}
    assert landed | {JobStatus.QUEUED} == set(JobStatus)  # a job is created queued; every status is reachable


def test_the_module_docstring_lists_the_table():
    lines = [line.split() for line in states.__doc__.splitlines() if line.startswith("    ")]
    rows = {words[0]: words[1:] for words in lines}
    for name, rule in TABLE.items():
        listed = rows.pop(name)
        assert listed[:2] == [",".join(sorted(rule.sources)), rule.target], name
    assert list(rows) == ["transition"]


@pytest.mark.parametrize("name", list(Transition))
@pytest.mark.parametrize("status", list(JobStatus))
def test_every_transition_from_every_status_happens_or_is_illegal(database_url, status, name):
    rule = TABLE[name]
    job_id = make_job(database_url, status, **rule.requires)
    before = row(database_url, job_id)
    if status not in rule.sources:
        with pytest.raises(IllegalTransition) as refused:
            attempt(database_url, job_id, name)
        assert refused.value.status == status and refused.value.transitions == (name,)
        assert str(status) in str(refused.value) and str(name) in str(refused.value)
        assert row(database_url, job_id) == before
        return
    assert attempt(database_url, job_id, name) is True
    after = row(database_url, job_id)
    assert after["status"] == rule.target
    for flag, value in rule.sets.items():
        if flag in ("cancel_requested", "pause_requested"):
            assert after[flag] is value, flag
    if rule.target != JobStatus.RUNNING:
        assert after["lease_expires_at"] is None and after["pause_requested"] is False
    assert (after["finished_at"] is not None) == rule.target.is_final
    assert after["lost_attempts"] == before["lost_attempts"] + (name == Transition.LOSE_LEASE)
    unwritten = set(COLUMNS) - {"status", "finished_at", "lost_attempts", *rule.writes()}
    assert {column: after[column] for column in unwritten} == {column: before[column] for column in unwritten}


GUARDED = [(name, flag) for name, rule in TABLE.items() for flag in rule.requires]


@pytest.mark.parametrize(("name", "flag"), GUARDED)
def test_a_guard_that_does_not_hold_refuses_without_a_change(database_url, name, flag):
    rule = TABLE[name]
    (status,) = rule.sources
    job_id = make_job(database_url, status, **{**rule.requires, flag: not rule.requires[flag]})
    before = row(database_url, job_id)
    assert attempt(database_url, job_id, name) is False
    assert row(database_url, job_id) == before


def test_a_lease_not_yet_expired_or_of_another_attempt_is_not_lost(database_url):
    job_id = make_job(database_url, JobStatus.RUNNING, lease_expires_at=now() + 60, attempt=2)
    assert attempt(database_url, job_id, Transition.LOSE_LEASE) is False
    job_id = make_job(database_url, JobStatus.RUNNING, attempt=2)
    assert attempt(database_url, job_id, Transition.LOSE_LEASE, of_attempt=1) is False
    assert attempt(database_url, job_id, Transition.LOSE_LEASE, of_attempt=2) is True


def test_first_of_makes_the_first_allowed_and_refuses_when_none_is(database_url):
    job_id = make_job(database_url, JobStatus.RUNNING)
    with session_scope(database_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        picked = states.first_of(session, job, Transition.PAUSE_QUEUED, Transition.REQUEST_PAUSE)
        assert picked == Transition.REQUEST_PAUSE and job.pause_requested
        assert states.first_of(session, job, Transition.PAUSE_QUEUED, Transition.REQUEST_PAUSE) is None
        with pytest.raises(IllegalTransition) as refused:
            states.first_of(session, job, Transition.RESUME, Transition.CLAIM)
        assert refused.value.transitions == (Transition.RESUME, Transition.CLAIM)


@pytest.mark.parametrize("name", [Transition.CLAIM, Transition.REQUEST_CANCEL])
def test_of_two_sessions_racing_a_transition_exactly_one_makes_it(database_url, name):
    (status,) = TABLE[name].sources
    job_id = make_job(database_url, status)
    make = get_sessionmaker(database_url)
    first, second = make(), make()
    outcome: dict[str, Any] = {}

    def race() -> None:
        job = second.scalar(select(Job).where(Job.id == job_id))
        try:
            outcome["second"] = states.transition(second, job, name)  # waits for the first one's lock
        except IllegalTransition as refused:
            outcome["second"] = refused
        finally:
            second.commit()

    try:
        job = first.scalar(select(Job).where(Job.id == job_id))
        assert states.transition(first, job, name) is True
        racer = threading.Thread(target=race)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second transition did not wait for the first one's lock"
        first.commit()
        racer.join(30)
        assert not racer.is_alive()
    finally:
        first.close()
        second.close()
    if status == TABLE[name].target:  # a flag transition: the status allows it, the flag guard refuses it
        assert outcome["second"] is False
    else:
        assert isinstance(outcome["second"], IllegalTransition)
    assert row(database_url, job_id)["status"] == TABLE[name].target
