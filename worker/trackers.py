"""The experiment trackers a job reports to (training_config.report_to), set up from this worker's settings.

The trainer gets transformers' own callbacks (MLflowCallback, TensorBoardCallback, WandbCallback), logging
into a run opened here for the job and named after it. A later attempt of the job opens the same run again:
MLflow finds it by the job's tag, W&B by its id (the job id), and TensorBoard writes to the job's directory,
hiding what an earlier attempt logged after the step this one resumes from.

A tracker only mirrors the job's metrics events, which stay the job's record: one that fails to open, to log
or to close (its server down, its disk full) is said in a warning event and left out of the rest of the
attempt; the job trains on and ends as it would have without it. Only what the worker can check before
training (a tracker not configured or not installed here) fails the job, before it trains.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

from transformers import Trainer, TrainerCallback
from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from app.config import Settings
from app.specs import TRACKERS, TrainingConfig
from app.trackers import check_offered

JOB_TAG = "phitune.job_id"
# A job id and a suffix name a directory (TensorBoard) and go into a search filter (MLflow): the API makes
# both of these characters only, and the worker checks again rather than trust what a message carried.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]


class TrackerUnavailable(RuntimeError):
    """A tracker the job names cannot be used on this worker: the job fails before it trains."""


class Warner(Protocol):
    def message(self, text: str, *, level: str = "info", data: dict | None = None) -> None: ...


@dataclass(frozen=True)
class Tracking:
    """The trackers one job reports to, with the worker settings that say where."""

    job_id: str
    run_name: str
    trackers: tuple[str, ...]
    settings: Settings


@dataclass
class Runs:
    """How the attempt's runs end: FAILED unless the attempt says otherwise before leaving `reporting`;
    KILLED for an attempt that stopped early (cancelled, paused, handed back at shutdown)."""

    status: RunStatus = "FAILED"

    def ended(self, *, interrupted: bool) -> None:
        self.status = "KILLED" if interrupted else "FINISHED"


def for_job(job_id: str, suffix: str | None, config: TrainingConfig, settings: Settings) -> Tracking | None:
    """The job's tracking on this worker, None when it names no tracker. TrackerUnavailable, saying what to
    set or install, for a tracker that is not configured here: the API checked the settings it shares, but
    only the worker knows its own settings, environment and packages."""
    if not config.report_to:
        return None
    for what, name in (("job id", job_id), ("suffix", suffix)):
        if name is not None and not _NAME.fullmatch(name):
            raise TrackerUnavailable(f"the job's {what} {name!r} cannot name a tracker run")
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
def reporting(
    tracking: Tracking | None, trainer: Trainer, reporter: Warner, *, resumed_step: int
) -> Iterator[Runs]:
    """Open the job's runs and add their callbacks to `trainer` for one attempt, which continues after
    `resumed_step` (0: from the start); the runs end with the attempt, with the status the caller sets on
    the yielded `Runs` (FAILED if it sets none, or raises). Only the main process reports. A tracker that
    fails is said to `reporter` as a warning, once, and never fails or stops the attempt."""
    runs = Runs()
    if tracking is None or not trainer.is_world_process_zero():
        yield runs
        return
    with ExitStack() as opened:
        for name in tracking.trackers:
            run = _Contained(name, _RUNS[name](tracking, resumed_step, runs), reporter)
            if (callback := opened.enter_context(run)) is not None:
                trainer.add_callback(_GUARDS[name](callback, run))
        yield runs


class _Contained(AbstractContextManager[TrainerCallback | None]):
    """One tracker's run, whose failures (to open, to log through its callback, to close) are warnings."""

    def __init__(self, name: str, run: AbstractContextManager[TrainerCallback], reporter: Warner) -> None:
        self.name, self._run, self._reporter = name, run, reporter
        self._open = False
        self.failed = False

    def fail(self, doing: str, problem: BaseException) -> None:
        """Say once that the tracker failed; the attempt goes on without it."""
        if self.failed:
            return
        self.failed = True
        log.warning("the %s tracker failed %s", self.name, doing, exc_info=problem)
        self._reporter.message(
            f"The {self.name} tracker failed {doing} ({type(problem).__name__}: {str(problem)[:300]}); "
            "the job goes on without it, and its metrics events still have every step",
            level="warn",
            data={"tracker": self.name},
        )

    def __enter__(self) -> TrainerCallback | None:
        try:
            callback = self._run.__enter__()
        except Exception as problem:
            self.fail("to start its run", problem)
            return None
        self._open = True
        return callback

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._open:
            self._open = False
            try:
                self._run.__exit__(kind, value, trace)
            except Exception as problem:
                if problem is not value:  # the attempt's own exception goes on as it is
                    self.fail("to end its run", problem)


class _Guarded(TrainerCallback):
    """A tracker's callback whose every call is contained: the first exception is a warning and the tracker
    is called no more. It never changes the trainer's control (a tracker neither stops nor saves)."""

    def __init__(self, callback: TrainerCallback, run: _Contained) -> None:
        self.callback, self.run = callback, run

    def _call(self, event: str, *arguments: Any, **keywords: Any) -> None:
        if self.run.failed:
            return
        try:
            getattr(self.callback, event)(*arguments, **keywords)
        except Exception as problem:
            self.run.fail(f"in {event}", problem)


def _contained(event: str) -> Callable[..., None]:
    def call(self: _Guarded, *arguments: Any, **keywords: Any) -> None:
        self._call(event, *arguments, **keywords)

    call.__name__ = event
    return call


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    setattr(_Guarded, _event, _contained(_event))

# A class per tracker: the trainer warns when two callbacks of one class are added.
_GUARDS: dict[str, type[_Guarded]] = {
    name: type(f"Guarded{name.title()}Callback", (_Guarded,), {}) for name in TRACKERS
}


# MLflow's own defaults retry a request 7 times over about 4 minutes, each try waiting up to 120 s for an
# answer: a server down or stuck would hold the attempt that long when its run starts, and again when it ends.
# Bounded while the job's run is open, where the worker's environment does not choose (MLflow reads these at
# each request).
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def _mlflow_run(tracking: Tracking, resumed_step: int, runs: Runs) -> Iterator[TrainerCallback]:
    unset = {name: value for name, value in MLFLOW_HTTP_BOUNDS.items() if name not in os.environ}
    with _environment(unset):
        yield from _mlflow_run_bounded(tracking, resumed_step, runs)


def _mlflow_run_bounded(tracking: Tracking, resumed_step: int, runs: Runs) -> Iterator[TrainerCallback]:
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
    try:
        # MLflow refuses a param logged again with another value, and every attempt's scratch output_dir
        # differs: the run keeps the params of the job's first attempt.
        with _environment({"MLFLOW_MAX_LOG_PARAMS": "0"} if earlier else {}):
            yield MLflowCallback()
    finally:
        mlflow.end_run(runs.status)


@contextmanager
def _tensorboard_run(tracking: Tracking, resumed_step: int, runs: Runs) -> Iterator[TrainerCallback]:
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
def _wandb_run(tracking: Tracking, resumed_step: int, runs: Runs) -> Iterator[TrainerCallback]:
    wandb = importlib.import_module("wandb")  # optional, and untyped
    run = wandb.init(
        project=tracking.settings.wandb_project, id=tracking.job_id, name=tracking.run_name, resume="allow"
    )
    try:
        yield WandbCallback()
    finally:
        run.finish(exit_code=1 if runs.status == "FAILED" else 0)


_RUNS: dict[str, Callable[[Tracking, int, Runs], AbstractContextManager[TrainerCallback]]] = {
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
