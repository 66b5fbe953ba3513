"""Regressions found reviewing issue 13 (DPO, dataset reports and dry runs, merged exports): concurrent export
requests make one export on SQLite too, an export request needs no body, and a DPO dry run's memory counts a
preference pair as two rows, as the worker does."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.api.test_dpo import PAIRS
from tests.api.test_dry_run import dry_client, dry_run  # noqa: F401 (dry_client: a fixture)
from tests.api.test_internal import succeeded_job
from tests.utils import upload_file

JOBS = "/v1/fine_tuning/jobs"


def test_concurrent_export_requests_make_one_export(client, auth) -> None:
    """16 requests at once, POSTs and polls of …/merged alike: one export, one message's worth of work."""
    job = succeeded_job(client, auth)
    start = threading.Barrier(16)

    def ask(index: int) -> tuple[int, str]:
        start.wait()
        if index % 2:
            response = client.post(f"{JOBS}/{job}/exports", json={"format": "merged"}, headers=auth)
        else:
            response = client.get(f"{JOBS}/{job}/merged", headers=auth)
        return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert {status for status, _ in answers} == {202}
    assert len({export_id for _, export_id in answers}) == 1, answers
    assert len(client.get(f"{JOBS}/{job}/exports", headers=auth).json()["data"]) == 1


def test_an_export_request_needs_no_body(client, auth) -> None:
    job = succeeded_job(client, auth)
    created = client.post(f"{JOBS}/{job}/exports", headers=auth)
    assert created.status_code == 202, created.text
    assert created.json()["format"] == "merged"


def test_a_dpo_dry_run_counts_a_pair_as_two_rows(dry_client, auth) -> None:  # noqa: F811
    """A DPO job's batch of 2 pairs holds 4 rows of up to max_seq_length (its file has no token counts): the
    memory of a packed supervised batch of 4 rows of max_seq_length, not of 2."""
    pairs = upload_file(dry_client, auth, PAIRS, name="preference.jsonl")
    chat = upload_file(dry_client, auth, PAIRS_AS_CHAT, name="chat.jsonl")
    shape = {"max_seq_length": 256, "gradient_checkpointing": False}
    dpo = dry_run(
        dry_client,
        auth,
        training_file=pairs,
        method={"type": "dpo"},
        training_config={**shape, "per_device_train_batch_size": 2},
    )
    assert dpo.status_code == 200, dpo.text

    def supervised(batch_size: int) -> float:
        config = {**shape, "packing": True, "per_device_train_batch_size": batch_size}
        response = dry_run(dry_client, auth, training_file=chat, training_config=config)
        assert response.status_code == 200, response.text
        return response.json()["estimated_memory_gb"]

    assert supervised(2) < supervised(4)  # the figures tell the two apart
    assert dpo.json()["estimated_memory_gb"] == supervised(4)


PAIRS_AS_CHAT = [{"messages": [*pair["input"]["messages"], *pair["preferred_output"]]} for pair in PAIRS]
