"""The experiment trackers a job reports to (training_config.report_to), set up from this worker's settings.

The trainer gets transformers' own callbacks (MLflowCallback, TensorBoardCallback, WandbCallback), logging
into a run opened here for the job and named after it. A later attempt of the job opens the same run again:
MLflow finds it by the job's tag, W&B by its id (the job id), and TensorBoard writes to the job's directory,
hiding what an earlier attempt logged after the step this one resumes from.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

from transformers import Trainer, TrainerCallback
from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from app.config import Settings
from app.specs import TrainingConfig
from app.trackers import check_offered

JOB_TAG = "phitune.job_id"


class TrackerUnavailable(RuntimeError):
    """A tracker the job names cannot be used on this worker: the job fails before it trains."""


@dataclass(frozen=True)
class Tracking:
    """The trackers one job reports to, with the worker settings that say where."""

    job_id: str
    run_name: str
    trackers: tuple[str, ...]
    settings: Settings


def for_job(job_id: str, suffix: str | None, config: TrainingConfig, settings: Settings) -> Tracking | None:
    """The job's tracking on this worker, None when it names no tracker. TrackerUnavailable, saying what to
    set or install, for a tracker that is not configured here: the API checked the settings it shares, but
    only the worker knows its own settings, environment and packages."""
    if not config.report_to:
        return None
    try:
        check_offered(config.report_to, settings)
    except ValueError as refusal:
        raise TrackerUnavailable(str(refusal)) from None
    for name in config.report_to:
        if name == "wandb" and not (
            os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled")
        ):
            raise TrackerUnavailable(
                "training_config.report_to: 'wandb' needs WANDB_API_KEY (or WANDB_MODE=offline) in this "
                "worker's environment"
            )
        if importlib.util.find_spec(name) is None:  # each tracker's package has the tracker's name
            raise TrackerUnavailable(
                f"training_config.report_to: '{name}' is not installed on this worker (pip install {name})"
            )
    run_name = job_id if suffix is None else f"{job_id}:{suffix}"
    return Tracking(job_id, run_name, tuple(config.report_to), settings)


@contextmanager
def reporting(tracking: Tracking | None, trainer: Trainer, *, resumed_step: int) -> Iterator[None]:
    """Open the job's runs and add their callbacks to `trainer` for one attempt, which continues after
    `resumed_step` (0: from the start); the runs end with the attempt. Only the main process reports."""
    if tracking is None or not trainer.is_world_process_zero():
        yield
        return
    with ExitStack() as runs:
        for name in tracking.trackers:
            trainer.add_callback(runs.enter_context(_RUNS[name](tracking, resumed_step)))
        yield


@contextmanager
def _mlflow_run(tracking: Tracking, resumed_step: int) -> Iterator[TrainerCallback]:
    import mlflow

    settings = tracking.settings
    assert settings.mlflow_tracking_uri is not None  # for_job checked it
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.mlflow_experiment_name)
    earlier = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{tracking.job_id}'",
        output_format="list",
    )
    if earlier:
        mlflow.start_run(run_id=earlier[0].info.run_id)
    else:
        mlflow.start_run(
            experiment_id=experiment.experiment_id,
            run_name=tracking.run_name,
            tags={JOB_TAG: tracking.job_id},
        )
    status = "FAILED"
    try:
        # MLflow refuses a param logged again with another value, and every attempt's scratch output_dir
        # differs: the run keeps the params of the job's first attempt.
        with _environment({"MLFLOW_MAX_LOG_PARAMS": "0"} if earlier else {}):
            yield MLflowCallback()
        status = "FINISHED"
    finally:
        mlflow.end_run(status)


@contextmanager
def _tensorboard_run(tracking: Tracking, resumed_step: int) -> Iterator[TrainerCallback]:
    from torch.utils.tensorboard import SummaryWriter

    # TensorBoard hides what an earlier attempt logged from purge_step on: this attempt logs those steps anew.
    writer = SummaryWriter(
        str(tracking.settings.resolved_tensorboard_dir / tracking.job_id), purge_step=resumed_step + 1
    )
    try:
        yield TensorBoardCallback(writer)
    finally:
        writer.close()


@contextmanager
def _wandb_run(tracking: Tracking, resumed_step: int) -> Iterator[TrainerCallback]:
    wandb = importlib.import_module("wandb")  # optional, and untyped
    run = wandb.init(
        project=tracking.settings.wandb_project, id=tracking.job_id, name=tracking.run_name, resume="allow"
    )
    exit_code = 1
    try:
        yield WandbCallback()
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


_RUNS: dict[str, Callable[[Tracking, int], AbstractContextManager[TrainerCallback]]] = {
    "mlflow": _mlflow_run,
    "tensorboard": _tensorboard_run,
    "wandb": _wandb_run,
}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ, where transformers' integrations read their options, and then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
