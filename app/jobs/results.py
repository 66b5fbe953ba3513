"""A succeeded job's result file, as OpenAI's: a CSV of its per-step metrics, built from its metrics events
(the source of truth) in the transaction that records the success, so that it is made once and only with it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from app.files.service import RESULTS_PURPOSE, store_generated
from app.internal.contracts import DPO_METRICS
from app.models import Job
from app.repositories import jobs
from app.storage import Storage

COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "eval_loss",
    "valid_mean_token_accuracy": "eval_mean_token_accuracy",
}
"""The CSV's columns, OpenAI's names, each with the key of the metrics event data it is read from."""

DPO_COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    **{f"train_{name}": f"train_{name}" for name in DPO_METRICS.values()},
    "valid_loss": "eval_loss",
    **{f"valid_{name}": f"eval_{name}" for name in DPO_METRICS.values()},
}
"""A preference (DPO) job's columns: its DPO loss and rewards, on the training and the validation batches."""


def metrics_csv(events: Iterable[dict[str, Any]], columns: dict[str, str] = COLUMNS) -> bytes:
    """The CSV of metrics events' data, in the order they were posted: a row per step, an empty cell where
    a value is missing. A step logged again (an attempt that resumed from an earlier step) replaces the rows
    logged from that step on, which the resumed attempt trained anew."""
    rows: list[list[Any]] = []
    for data in events:
        step = data.get("step")
        if not _number(step):
            continue
        while rows and rows[-1][0] >= step:
            rows.pop()
        rows.append([data.get(key) if _number(data.get(key)) else "" for key in columns.values()])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return text.getvalue().encode()


def _number(value: Any) -> bool:
    # A loss a diverged run logged as NaN is stored as null (app.internal.contracts): an empty cell.
    return isinstance(value, int | float) and not isinstance(value, bool)


def store_result_file(session: Session, storage: Storage, job: Job) -> str:
    """Make the job's result file from its metrics events; returns its id."""
    columns = COLUMNS if job.method is None else DPO_COLUMNS
    content = metrics_csv(jobs.metrics_data(session, job.id), columns)
    filename = f"{job.id}-step_metrics.csv"
    file = store_generated(
        session, storage, job.tenant_id, filename=filename, purpose=RESULTS_PURPOSE, content=content
    )
    return file.id
