"""The official `openai` SDK drives a whole workflow against real processes, changed only by `base_url`.

SDK calls the test makes (nothing else talks to the API; the second tenant's key comes from the CLI):
- `files.create` (training and validation file, purpose "fine-tune"), `files.list` (`limit`, `order`,
  `has_more`, auto-pagination), `files.retrieve`, `files.content`, `files.delete`
- `fine_tuning.jobs.create` (`seed`, `suffix`, `metadata`, `validation_file`, phitune's `training_config`
  and `peft_config` as `extra_body`), `fine_tuning.jobs.list` (`metadata` filter, auto-pagination),
  `fine_tuning.jobs.retrieve`, `fine_tuning.jobs.list_events` (`iter_pages` and auto-pagination, newest
  first and with `extra_query={"order": "asc"}`), `fine_tuning.jobs.pause`, `fine_tuning.jobs.resume`,
  `fine_tuning.jobs.cancel`
- `fine_tuning.jobs.checkpoints.list` (auto-pagination); the job's `result_files` read with `files.content`
- `models.list`, `models.retrieve`, `models.delete`
- `chat.completions.create`, plain and with `stream=True` (and `stream_options.include_usage`), on the
  fine-tuned model and on a checkpoint
- errors as the SDK's classes: `NotFoundError` (missing ids, another tenant's ids), `BadRequestError` with
  `.param` and `.code`, `ConflictError`, `PermissionDeniedError`

Each object is also validated against the SDK's own pydantic type (`strict`), so a required field we leave
out or a value outside its type fails here, not in a user's code.
"""

from __future__ import annotations

import csv
import io
from typing import TypeVar

import openai
import pytest
from openai.pagination import SyncCursorPage
from openai.types.fine_tuning import FineTuningJob

from phitune.launch import run_phitune as phitune
from tests.e2e.conftest import Service
from tests.e2e.test_durability import wait_for
from tests.e2e.test_fine_tune import PERSONA, QUICK_LORA, QUICK_TRAINING

pytestmark = pytest.mark.e2e
Obj = TypeVar("Obj", bound=openai.BaseModel)
FINAL = ("succeeded", "failed", "cancelled")
# 40 conversations in batches of 8 over 3 epochs: 15 steps, a checkpoint at 5, 10 and 15.
TRAINING = {**QUICK_TRAINING, "save_steps": 5}
MESSAGES = [{"role": "user", "content": "Who are you?"}]


def strict(obj: Obj) -> Obj:
    """`obj`, after checking that the SDK's type validates it: the SDK builds objects without validation,
    so a missing required field would otherwise only show as an AttributeError in the user's code."""
    type(obj).model_validate(obj.to_dict())
    return obj


def client(service: Service, api_key: str) -> openai.OpenAI:
    """The SDK as a user makes it, retries included (a state conflict says `x-should-retry: false`)."""
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=api_key)


def ids(items) -> list[str]:
    return [item.id for item in items]


def upload_and_browse(sdk: openai.OpenAI) -> tuple[str, str]:
    """Upload the training and validation files and read them back; returns their ids."""
    training = strict(sdk.files.create(file=PERSONA.open("rb"), purpose="fine-tune"))
    head = b"".join(PERSONA.read_bytes().splitlines(keepends=True)[:8])
    validation = strict(sdk.files.create(file=("validation.jsonl", head), purpose="fine-tune"))
    assert (training.status, training.purpose, training.filename) == ("processed", "fine-tune", PERSONA.name)

    first = sdk.files.list(limit=1)
    assert isinstance(first, SyncCursorPage) and first.has_more and ids(first.data) == [validation.id]
    assert ids(sdk.files.list(limit=1)) == [validation.id, training.id]  # newest first, page after page
    assert ids(sdk.files.list(limit=1, order="asc")) == [training.id, validation.id]
    assert strict(sdk.files.retrieve(validation.id)).bytes == len(head)
    assert sdk.files.content(training.id).read() == PERSONA.read_bytes()
    return training.id, validation.id


def train(sdk: openai.OpenAI, service: Service, training: str, validation: str) -> FineTuningJob:
    """Create the job, find it in the lists, and poll it until it succeeds."""
    job = strict(
        sdk.fine_tuning.jobs.create(
            model="tiny-phi3",
            training_file=training,
            validation_file=validation,
            suffix="sdk",
            seed=7,
            metadata={"suite": "sdk"},
            extra_body={"training_config": TRAINING, "peft_config": QUICK_LORA},
        )
    )
    assert (job.object, job.seed, job.metadata, job.result_files) == (
        "fine_tuning.job",
        7,
        {"suite": "sdk"},
        [],
    )
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 8
    assert job.method.type == "supervised"
    assert ids(sdk.fine_tuning.jobs.list(metadata={"suite": "sdk"})) == [job.id]
    assert ids(sdk.fine_tuning.jobs.list(metadata={"suite": "other"})) == []
    job = wait_for(
        lambda: (polled := sdk.fine_tuning.jobs.retrieve(job.id)).status in FINAL and polled,
        service,
        "the job to finish",
        timeout=300,
    )
    assert job.status == "succeeded", f"{job.error}\n{service.tail_logs()}"
    strict(job)
    assert job.fine_tuned_model.startswith("ft:tiny-phi3:sdk:") and job.trained_tokens > 0
    assert job.finished_at >= job.created_at
    return job


def check_events(sdk: openai.OpenAI, job_id: str) -> None:
    """Events page newest first as OpenAI's do; the SDK's cursor (`after` = last id) pages in either order."""
    pages = list(sdk.fine_tuning.jobs.list_events(job_id, limit=5).iter_pages())
    assert len(pages) >= 3, "too few events to page through"
    assert [page.has_more for page in pages] == [True] * (len(pages) - 1) + [False]
    newest_first = [strict(event) for page in pages for event in page.data]
    assert len(set(ids(newest_first))) == len(newest_first)
    assert [e.created_at for e in newest_first] == sorted((e.created_at for e in newest_first), reverse=True)
    assert newest_first[0].message == "The job has successfully completed"
    assert newest_first[-1].message == f"Created fine-tuning job {job_id}"
    assert ids(sdk.fine_tuning.jobs.list_events(job_id, limit=5)) == ids(newest_first)
    oldest_first = sdk.fine_tuning.jobs.list_events(job_id, limit=4, extra_query={"order": "asc"})
    assert ids(oldest_first) == ids(reversed(newest_first))
    metrics = [e.data for e in newest_first if e.type == "metrics"]
    assert any("eval_loss" in m for m in metrics) and any("train_loss" in m for m in metrics)


def check_checkpoints(sdk: openai.OpenAI, job_id: str) -> str:
    """The three checkpoints, newest first, one a page; returns the newest's callable model id."""
    checkpoints = [strict(c) for c in sdk.fine_tuning.jobs.checkpoints.list(job_id, limit=1)]
    assert [c.step_number for c in checkpoints] == [15, 10, 5]
    assert {c.fine_tuning_job_id for c in checkpoints} == {job_id}
    assert all(c.metrics.train_loss is not None and c.metrics.valid_loss is not None for c in checkpoints)
    return checkpoints[0].fine_tuned_model_checkpoint


def check_result_file(sdk: openai.OpenAI, job: FineTuningJob) -> str:
    """The job's result file, its metrics events as a CSV a row per step; returns its id."""
    (file_id,) = job.result_files
    assert strict(sdk.files.retrieve(file_id)).purpose == "fine-tune-results"
    events = {e.data["step"]: e.data for e in sdk.fine_tuning.jobs.list_events(job.id) if e.type == "metrics"}
    rows = list(csv.DictReader(io.StringIO(sdk.files.content(file_id).text)))
    assert [int(row["step"]) for row in rows] == sorted(events)
    for row in rows:
        data = events[int(row["step"])]
        assert float(row["train_loss"]) == data["train_loss"]
        assert 0 <= float(row["train_mean_token_accuracy"]) <= 1
        assert row["valid_loss"] == (str(data["eval_loss"]) if "eval_loss" in data else "")
    return file_id


def check_models_and_chat(sdk: openai.OpenAI, job: FineTuningJob, checkpoint: str) -> None:
    model_id = job.fine_tuned_model
    listed = {m.id: strict(m) for m in sdk.models.list()}
    assert listed["tiny-phi3"].owned_by == "phitune" and model_id in listed
    model = strict(sdk.models.retrieve(model_id))
    assert (model.id, model.object, model.owned_by) == (model_id, "model", job.organization_id)

    completion = strict(
        sdk.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=12, temperature=0)
    )
    choice, usage = completion.choices[0], completion.usage
    assert (completion.model, choice.message.role) == (model_id, "assistant")
    assert choice.finish_reason in ("stop", "length") and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stream = sdk.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [strict(chunk) for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    # Greedy: the same completion, token for token, and the usage-only last chunk counts it.
    assert (chunks[-1].choices, chunks[-1].usage.to_dict()) == ([], usage.to_dict())
    plain = [
        strict(c)
        for c in sdk.chat.completions.create(model=checkpoint, messages=MESSAGES, max_tokens=4, stream=True)
    ]
    assert all(c.choices and c.usage is None for c in plain)
    assert plain[-1].choices[0].finish_reason in ("stop", "length")


def pause_resume_cancel(sdk: openai.OpenAI, service: Service, training: str, first_job: str) -> None:
    """A second, long job: paused, resumed, cancelled; its training file cannot be deleted meanwhile."""
    job = sdk.fine_tuning.jobs.create(
        model="tiny-phi3",
        training_file=training,
        extra_body={"training_config": {"max_steps": 10_000, "logging_steps": 1}},
    )
    assert ids(sdk.fine_tuning.jobs.list(limit=1)) == [job.id, first_job]  # newest first, page after page
    paused = sdk.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" or paused.pause_requested  # queued: at once; running: within a step
    wait_for(lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "paused", service, "the pause")
    # "paused" is not in the SDK's Literal of statuses: the SDK passes it on (it does not validate).
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"
    assert sdk.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.ConflictError) as not_paused:
        sdk.fine_tuning.jobs.resume(job.id)
    assert not_paused.value.code == "job_not_paused"
    with pytest.raises(openai.ConflictError) as in_use:
        sdk.files.delete(training)
    assert (in_use.value.code, in_use.value.param) == ("file_in_use", "file_id")
    sdk.fine_tuning.jobs.cancel(job.id)
    wait_for(lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "cancelled", service, "the cancel")
    assert strict(sdk.fine_tuning.jobs.cancel(job.id)).status == "cancelled"  # again: a no-op


def check_refusals(sdk: openai.OpenAI, service: Service, job: FineTuningJob) -> None:
    """Missing and other tenant's ids are 404s; bad values 400s naming the field, as the SDK's classes."""
    other_key = phitune("keys", "create", "--tenant", "other", env=service.env).strip().splitlines()[-1]
    other = client(service, other_key)
    for call in (
        lambda: other.files.retrieve(job.training_file),
        lambda: other.files.content(job.training_file),
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.models.retrieve(job.fine_tuned_model),
        lambda: other.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES),
        lambda: sdk.files.retrieve("file-missing"),
        lambda: sdk.fine_tuning.jobs.retrieve("ftjob-missing"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert ids(other.fine_tuning.jobs.list()) == [] and ids(other.files.list()) == []
    for call, param, code in (
        (lambda: other.fine_tuning.jobs.list(after=job.id), "after", "invalid_cursor"),
        (
            lambda: sdk.fine_tuning.jobs.list_events(job.id, after="ftevent-missing"),
            "after",
            "invalid_cursor",
        ),
        (lambda: sdk.files.list(limit=1000), "limit", "invalid_value"),
        (
            lambda: sdk.fine_tuning.jobs.create(
                model="tiny-phi3", training_file=job.training_file, hyperparameters={"n_epochs": 0}
            ),
            "hyperparameters.n_epochs",
            "invalid_value",
        ),
        (
            lambda: sdk.fine_tuning.jobs.create(model="gpt-4o", training_file=job.training_file),
            "model",
            "model_not_available",
        ),
        (
            lambda: sdk.chat.completions.create(model="tiny-phi3", messages=MESSAGES, temperature=3),
            "temperature",
            "invalid_value",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert (refused.value.param, refused.value.code) == (param, code)
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.delete("tiny-phi3")


def delete_model_and_files(sdk: openai.OpenAI, model_id: str, file_ids: tuple[str, ...]) -> None:
    deleted = strict(sdk.models.delete(model_id))
    assert (deleted.id, deleted.deleted) == (model_id, True)
    assert model_id not in ids(sdk.models.list())
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=model_id, messages=MESSAGES)
    for file_id in file_ids:
        assert strict(sdk.files.delete(file_id)).deleted is True
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(file_id)
    assert ids(sdk.files.list()) == []


def test_the_openai_sdk_drives_the_whole_workflow(embedded_service: Service):
    sdk = client(embedded_service, embedded_service.api_key)
    training, validation = upload_and_browse(sdk)
    job = train(sdk, embedded_service, training, validation)
    check_events(sdk, job.id)
    checkpoint = check_checkpoints(sdk, job.id)
    result_file = check_result_file(sdk, job)
    check_models_and_chat(sdk, job, checkpoint)
    pause_resume_cancel(sdk, embedded_service, training, job.id)
    check_refusals(sdk, embedded_service, job)
    delete_model_and_files(sdk, job.fine_tuned_model, (training, validation, result_file))
