"""Experiment trackers, for real: the tiny Phi-3 trains, reporting to a real `mlflow server` and to
TensorBoard event files, which are read back through MLflow's client and TensorBoard's EventAccumulator. A
job names trackers only: anything else a tenant could point a tracker with is refused at the API, and a
tracker the server does not offer is refused at creation, or fails the job before it trains."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from app.config import Settings
from app.internal.contracts import ClaimReply
from app.main import create_app
from app.specs import PeftConfig, TrainingConfig
from phitune.launch import free_port
from tests.api.test_internal import claim
from tests.utils import CHAT_LINES, upload_file
from tests.worker.conftest import PERSONA_FILE, Recorder, persona_inputs
from worker import tasks, trackers
from worker.recipe import RecipeInputs, train

JOB_ID = "ftjob-trackers"
EXPERIMENT = "phitune-tests"
# 40 persona examples in batches of 8: 5 steps an epoch, 10 in all; metrics every 2 steps, and a resume state
# (with a checkpoint) every 4, which the second attempt resumes from.
CONFIG = TrainingConfig(
    learning_rate=2e-2,
    num_train_epochs=2,
    per_device_train_batch_size=8,
    warmup_ratio=0,
    logging_steps=2,
    save_steps=4,
    seed=7,
    report_to=["mlflow", "tensorboard"],
)
RESUMED_STEP = 4


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free local port, its runs in SQLite, without the job runner nothing here uses."""
    directory = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination", str(directory / "artifacts"),
    ]  # fmt: skip
    log = (directory / "server.log").open("wb")
    server = subprocess.Popen(
        command,
        cwd=directory,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its uvicorn child is stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert server.poll() is None, (directory / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not start within 60 s"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


class ErrorLog(logging.Handler):
    """Keeps the errors a library logs: MLflow logs, rather than raises, what its server refused to store."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Attempts:
    """A job trained to its end, then resumed from its step-4 state, as after a worker that died there."""

    tracking: trackers.Tracking
    first: Recorder
    second: Recorder
    mlflow_errors: list[str]


@pytest.fixture(scope="module")
def attempts(mlflow_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Attempts:
    scratch = tmp_path_factory.mktemp("trackers")
    settings = Settings(
        data_dir=scratch / "data",
        mlflow_tracking_uri=mlflow_server,
        mlflow_experiment_name=EXPERIMENT,
        tensorboard_dir=scratch / "tensorboard",
    )
    tracking = trackers.for_job(JOB_ID, "bot", CONFIG, settings)
    assert tracking is not None

    def attempt(name: str, recorder: Recorder, resume_from: Path | None = None) -> Recorder:
        inputs = persona_inputs(
            tiny_model_dir,
            training_config=CONFIG,
            peft_config=PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0),
            output_dir=scratch / name,
            resume_from=resume_from,
            tracking=tracking,
        )
        train(inputs, recorder)
        return recorder

    errors = ErrorLog()
    logging.getLogger("mlflow").addHandler(errors)
    try:
        first = attempt("first", Recorder())
        second = attempt("second", Recorder(), resume_from=first.states[RESUMED_STEP])
    finally:
        logging.getLogger("mlflow").removeHandler(errors)
    return Attempts(tracking, first, second, errors.messages)


def test_the_job_has_one_mlflow_run_with_its_params_and_every_attempts_losses(
    attempts: Attempts, mlflow_server: str
) -> None:
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id], f"tags.`{trackers.JOB_TAG}` = '{JOB_ID}'")
    assert run.info.run_name == f"{JOB_ID}:bot"
    assert run.info.status == "FINISHED"
    params = run.data.params
    job_params = {name: params[name] for name in ("learning_rate", "per_device_train_batch_size", "seed")}
    assert job_params == {"learning_rate": "0.02", "per_device_train_batch_size": "8", "seed": "7"}
    # The run keeps its first attempt's params: the resumed attempt, whose scratch directory differs, logs
    # none (MLflow would refuse them, and everything logged in the same batch).
    assert params["output_dir"].startswith(str(attempts.tracking.settings.data_dir.parent / "first"))
    assert attempts.mlflow_errors == []

    history = client.get_metric_history(run.info.run_id, "loss")
    first = [(event["step"], event["train_loss"]) for event in attempts.first.events]
    second = [(event["step"], event["train_loss"]) for event in attempts.second.events]
    assert [step for step, _ in first] == [2, 4, 6, 8, 10] and [step for step, _ in second] == [6, 8, 10]
    # MLflow keeps both attempts' points for the steps logged again: it has no way to replace a point.
    assert sorted((metric.step, metric.value) for metric in history) == sorted(first + second)
    assert first[-1][1] < first[0][1] - 1.0  # the loss falls across steps


def test_tensorboard_shows_each_step_once_from_the_attempt_that_logged_it_last(attempts: Attempts) -> None:
    directory = attempts.tracking.settings.resolved_tensorboard_dir / JOB_ID
    assert len(list(directory.glob("events.out.tfevents.*"))) == 2  # one file per attempt
    events = EventAccumulator(str(directory))
    events.Reload()
    logged = events.Scalars("train/loss")
    expected = [event for event in attempts.first.events if event["step"] <= RESUMED_STEP]
    expected += attempts.second.events
    assert [scalar.step for scalar in logged] == [event["step"] for event in expected] == [2, 4, 6, 8, 10]
    # float32 in the event file
    assert [scalar.value for scalar in logged] == pytest.approx([event["train_loss"] for event in expected])


def test_tracker_options_other_than_its_name_are_refused_at_the_api(
    client: TestClient, auth: dict[str, str]
) -> None:
    training_file = upload_file(client, auth, CHAT_LINES)
    injections = {
        "logging_dir": "/etc/cron.d",
        "run_name": "../../escape",
        "project": "tenant-project",
        "push_to_hub": True,
        "hub_model_id": "tenant/model",
        "hub_token": "hf_x",
        "trackio_space_id": "tenant/space",
    }
    for field, value in injections.items():
        response = _create(client, auth, training_file, {field: value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == f"training_config.{field}"
    for report_to in ["all", "comet_ml", "http://collector.example", {"mlflow": "http://collector.example"}]:
        response = _create(client, auth, training_file, {"report_to": report_to})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"].startswith("training_config.report_to")


def test_a_tracker_the_server_does_not_offer_is_refused_at_creation(
    client: TestClient, auth: dict[str, str]
) -> None:
    training_file = upload_file(client, auth, CHAT_LINES)
    unoffered = [("mlflow", "PHITUNE_MLFLOW_TRACKING_URI"), (["wandb"], "PHITUNE_WANDB_PROJECT")]
    for report_to, setting in unoffered:
        response = _create(client, auth, training_file, {"report_to": report_to})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("training_config.report_to", "tracker_not_configured")
        assert setting in error["message"] and error["message"].endswith("it offers tensorboard")


def test_the_trackers_a_job_names_are_stored_as_a_list_and_reach_the_worker(
    settings: Settings, auth: dict[str, str]
) -> None:
    offering = settings.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:9"})
    with TestClient(create_app(offering)) as client:
        training_file = upload_file(client, auth, CHAT_LINES)
        stored = [
            _create(client, auth, training_file, {"report_to": report_to}).json()["training_config"][
                "report_to"
            ]
            for report_to in ["none", "tensorboard", ["tensorboard", "mlflow", "tensorboard"]]
        ]
        assert stored == [[], ["tensorboard"], ["mlflow", "tensorboard"]]
        job = _create(client, auth, training_file, {"report_to": "mlflow"}, suffix="bot").json()
        reply, _ = claim(client, job["id"])
    assert (reply["suffix"], reply["training_config"]["report_to"]) == ("bot", ["mlflow"])


def test_a_tracker_this_worker_cannot_use_fails_the_job_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def inputs(report_to: str, **settings: str) -> None:
        claim = ClaimReply(
            job_id="ftjob-1", attempt=1, token="t", model="tiny-phi3", training_file="file-1",
            validation_file=None, training_config={"report_to": report_to}, peft_config={},
            heartbeat_seconds=10,
        )  # fmt: skip
        config = Settings(data_dir=tmp_path, base_models={"tiny-phi3": str(tmp_path)}, **settings)
        tasks.recipe_inputs(claim, config, tmp_path / "train.jsonl", None, tmp_path)

    unavailable = trackers.TrackerUnavailable
    with pytest.raises(unavailable, match=r"'mlflow' is not configured .*PHITUNE_MLFLOW_TRACKING_URI"):
        inputs("mlflow")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(unavailable, match=r"'wandb' needs WANDB_API_KEY"):
        inputs("wandb", wandb_project="phitune")
    monkeypatch.setenv("WANDB_MODE", "offline")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(unavailable, match=r"'wandb' is not installed .*pip install wandb"):
            inputs("wandb", wandb_project="phitune")


def _create(client: TestClient, auth: dict[str, str], training_file: str, training_config: dict, **body):
    body = {"model": "tiny-phi3", "training_file": training_file, "training_config": training_config, **body}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=auth)


# What each test below trains: the 40 persona examples in 5 steps, metrics every step.
SHORT = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "warmup_ratio": 0, "logging_steps": 1}


class Listener:
    """A TCP port that counts the connections made to it: where a tracker left on would send its data."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.socket.close()


def short_tracked_job(
    tiny_model_dir: Path, tmp_path: Path, tracker: str, job_id: str, settings: Settings
) -> RecipeInputs:
    """A SHORT job of the persona set that reports to `tracker` as `settings` configure it."""
    config = TrainingConfig(**SHORT, report_to=tracker)
    return persona_inputs(
        tiny_model_dir,
        training_config=config,
        peft_config=PeftConfig(r=8, lora_alpha=16),
        output_dir=tmp_path / "out",
        tracking=trackers.for_job(job_id, None, config, settings),
    )


def _claim(report_to: list[str] | None = None, job_id: str = "ftjob-quiet", suffix: str | None = None):
    config = {**SHORT, **({"report_to": report_to} if report_to is not None else {})}
    return ClaimReply(
        job_id=job_id, attempt=1, token="t", model="tiny-phi3", suffix=suffix, training_file="file-1",
        validation_file=None, training_config=config, peft_config={"r": 8, "lora_alpha": 16},
        heartbeat_seconds=10,
    )  # fmt: skip


def test_a_job_without_report_to_starts_no_tracker_even_with_every_tracker_installed_and_configured(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlflow and tensorboard are installed here (phitune[trackers]), the deployment offers MLflow and the
    worker's environment points MLflow and W&B somewhere: a job that names no tracker still logs nowhere
    but its own events. No run directory appears (mlruns/, runs/, wandb/ in the working directory, the
    TensorBoard directory) and nothing connects to the tracking server."""
    assert importlib.util.find_spec("mlflow") and importlib.util.find_spec("tensorboard")
    listener = Listener()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", listener.url)
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = Settings(
        data_dir=tmp_path / "data",
        base_models={"tiny-phi3": str(tiny_model_dir)},
        mlflow_tracking_uri=listener.url,
        tensorboard_dir=tmp_path / "tensorboard",
    )
    try:
        for report_to in (None, [], "none"):
            claim = _claim(report_to)  # type: ignore[arg-type]
            training = PERSONA_FILE
            inputs = tasks.recipe_inputs(claim, settings, training, None, tmp_path / "scratch")
            assert inputs.tracking is None
            recorder = Recorder()
            run = train(inputs, recorder)
            assert [event["step"] for event in recorder.events] == [1, 2, 3, 4, 5]
            integrations = tuple(INTEGRATION_TO_CALLBACK.values())
            assert not [
                each for each in run.trainer.callback_handler.callbacks if isinstance(each, integrations)
            ]
            assert not [text for _, text, _ in recorder.messages if "tracker" in text]
    finally:
        listener.close()
    assert listener.connections == 0
    assert {path.name for path in tmp_path.iterdir()} <= {"data", "scratch"}
    assert not (tmp_path / "data" / "tensorboard").exists()


def test_a_tracker_that_fails_mid_training_is_a_warning_and_the_job_trains_on(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorBoard's writer raises at the second step (a full disk) and again when closed: one warning event,
    every step trained and reported, the job's adapter saved; the trainer's control untouched."""
    from torch.utils.tensorboard import SummaryWriter

    calls = {"scalars": 0}
    real_add_scalar = SummaryWriter.add_scalar

    def add_scalar(self, tag, value, global_step=None, *args, **kwargs):
        if global_step is not None and global_step >= 2:
            calls["scalars"] += 1
            raise OSError(28, "No space left on device")
        return real_add_scalar(self, tag, value, global_step, *args, **kwargs)

    def close(self) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    monkeypatch.setattr(SummaryWriter, "close", close)
    settings = Settings(data_dir=tmp_path / "data", tensorboard_dir=tmp_path / "tensorboard")
    inputs = short_tracked_job(tiny_model_dir, tmp_path, "tensorboard", "ftjob-full-disk", settings)
    recorder = Recorder()
    result = train(inputs, recorder).result
    assert [event["step"] for event in recorder.events] == [1, 2, 3, 4, 5]
    assert result.adapter_dir is not None and not result.cancelled
    assert calls["scalars"] == 1  # called no more once it failed
    [warning] = [(text, data) for level, text, data in recorder.messages if "tracker" in text]
    assert warning[1] == {"tracker": "tensorboard"} and ("warn", *warning) in recorder.messages
    assert "tensorboard tracker failed in on_log (OSError" in warning[0]


def test_an_unreachable_mlflow_server_is_a_warning_and_the_job_trains_without_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment's MLflow server is down when the attempt starts: the job trains and succeeds, says so in
    a warning event, and leaves no MLflow run active in the worker's process for its next job. With the
    worker's environment silent on MLflow's HTTP retries, the wait is bounded (MLflow's own defaults would
    retry for about 4 minutes), and the environment is left as it was."""
    import mlflow

    for name in trackers.MLFLOW_HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    settings = Settings(data_dir=tmp_path / "data", mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    inputs = short_tracked_job(tiny_model_dir, tmp_path, "mlflow", "ftjob-mlflow-down", settings)
    recorder = Recorder()
    started = time.monotonic()
    result = train(inputs, recorder).result
    assert time.monotonic() - started < 90
    assert not set(trackers.MLFLOW_HTTP_BOUNDS) & set(os.environ)
    assert [event["step"] for event in recorder.events] == [1, 2, 3, 4, 5] and result.adapter_dir
    [warning] = [text for _, text, _ in recorder.messages if "tracker" in text]
    assert warning.startswith("The mlflow tracker failed to start its run")
    assert ("warn", warning, {"tracker": "mlflow"}) in recorder.messages
    assert mlflow.active_run() is None


@pytest.mark.parametrize(
    ("recorder", "status"),
    [(Recorder(stop_after=2), "KILLED"), (Recorder(hand_back_at=2), "KILLED"), (None, "FAILED")],
    ids=["cancelled", "paused", "failed"],
)
def test_an_attempt_that_stops_early_or_fails_ends_its_mlflow_run_so(
    recorder: Recorder | None, status: str, mlflow_server: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Cancelled or handed back (paused, preempted at SIGTERM): KILLED, and a later attempt opens it again;
    failed: FAILED. Either way the run is ended, and no run stays active in the worker for its next job."""
    import mlflow

    class Failing(Recorder):
        def on_metrics(self, metrics: dict) -> None:
            if metrics["step"] == 2:
                raise RuntimeError("the worker broke")
            super().on_metrics(metrics)

    job_id = f"ftjob-ends-{status.lower()}-{tmp_path.name[-8:].strip('_')}"
    settings = Settings(
        data_dir=tmp_path / "data", mlflow_tracking_uri=mlflow_server, mlflow_experiment_name=EXPERIMENT
    )
    inputs = short_tracked_job(tiny_model_dir, tmp_path, "mlflow", job_id, settings)
    if recorder is None:
        with pytest.raises(RuntimeError, match="the worker broke"):
            train(inputs, Failing())
    else:
        train(inputs, recorder)
    assert mlflow.active_run() is None
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id], f"tags.`{trackers.JOB_TAG}` = '{job_id}'")
    assert run.info.status == status


@pytest.mark.parametrize(
    ("job_id", "suffix"),
    [("../../etc", None), ("ftjob-1", "a/../../b"), ("ftjob-1' OR '1'='1", None), ("ftjob-1", "bot\n")],
)
def test_a_job_id_or_suffix_that_could_leave_the_trackers_dir_or_filter_is_refused(
    job_id: str, suffix: str | None, tmp_path: Path
) -> None:
    """The API makes both of [A-Za-z0-9_-] only; the worker checks again before naming a directory or a
    search filter after them."""
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(trackers.TrackerUnavailable, match="cannot name a tracker run"):
        trackers.for_job(job_id, suffix, TrainingConfig(report_to="tensorboard"), settings)


def test_the_claim_leaves_report_to_out_for_workers_that_predate_it(
    settings: Settings, auth: dict[str, str]
) -> None:
    """A worker of the previous version refuses a training_config key it does not know (TrainingConfig is
    closed): during a rolling deploy it must still train the jobs that name no tracker. The claim carries
    report_to only when it names some; the worker reads the absent key as none."""
    with TestClient(create_app(settings)) as client:
        training_file = upload_file(client, auth, CHAT_LINES)
        for report_to in [None, "none", []]:
            config = {} if report_to is None else {"report_to": report_to}
            job = _create(client, auth, training_file, config).json()
            assert job["training_config"]["report_to"] == []
            reply, _ = claim(client, job["id"])
            assert "report_to" not in reply["training_config"]
            assert TrainingConfig(**reply["training_config"]) == TrainingConfig(**job["training_config"])
        job = _create(client, auth, training_file, {"report_to": "tensorboard"}).json()
        reply, _ = claim(client, job["id"])
    assert reply["training_config"]["report_to"] == ["tensorboard"]


def test_an_mlflow_server_lost_before_the_run_ends_costs_the_job_nothing(
    mlflow_server: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending the run is a call to the server (set_terminated): one that fails once training is over is a
    warning, the job still succeeds with its adapter, and the worker's next job can open a run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    def lost(*_: object, **__: object) -> None:
        raise MlflowException("API request to /api/2.0/mlflow/runs/update failed: connection refused")

    monkeypatch.setattr(MlflowClient, "set_terminated", lost)
    settings = Settings(
        data_dir=tmp_path / "data", mlflow_tracking_uri=mlflow_server, mlflow_experiment_name=EXPERIMENT
    )
    inputs = short_tracked_job(tiny_model_dir, tmp_path, "mlflow", "ftjob-mlflow-lost", settings)
    recorder = Recorder()
    result = train(inputs, recorder).result
    assert [event["step"] for event in recorder.events] == [1, 2, 3, 4, 5] and result.adapter_dir
    [warning] = [text for _, text, _ in recorder.messages if "tracker" in text]
    assert warning.startswith("The mlflow tracker failed to end its run (MlflowException")
    assert mlflow.active_run() is None
