"""load_best_model_at_end: the recipe ships the checkpoint with the lowest eval loss, not the last step.

The run trains on the pirate persona and evaluates on plain support replies to the same kind of questions. The
eval loss first falls, as the model learns the chat format and the vocabulary of support replies, then rises
as the pirate talk takes over: its lowest point lies mid-run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, persona_inputs
from worker.recipe import RecipeResult, run_recipe

TRAINING_CONFIG = TrainingConfig(
    learning_rate=2e-2,
    max_steps=12,
    per_device_train_batch_size=8,
    warmup_ratio=0,
    lr_scheduler_type="constant",
    logging_steps=2,
    eval_steps=2,  # with load_best_model_at_end and no save_steps, a checkpoint at every evaluation
    seed=7,
    load_best_model_at_end=True,
)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def result(
    tiny_model_dir: Path, plain_replies: Path, recorder: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> RecipeResult:
    inputs = persona_inputs(
        tiny_model_dir,
        validation_file=plain_replies,
        training_config=TRAINING_CONFIG,
        peft_config=PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0),
        output_dir=tmp_path_factory.mktemp("attempt"),
    )
    return run_recipe(inputs, recorder)


def test_every_evaluation_is_a_checkpoint(result: RecipeResult, recorder: Recorder) -> None:
    assert [checkpoint["step"] for checkpoint in recorder.checkpoints] == [2, 4, 6, 8, 10, 12]
    eval_losses = {event["step"]: event["eval_loss"] for event in recorder.events}
    for checkpoint in recorder.checkpoints:
        assert checkpoint["metrics"]["valid_loss"] == eval_losses[checkpoint["step"]]


def test_the_lowest_eval_loss_is_shipped_though_not_last(result: RecipeResult, recorder: Recorder) -> None:
    losses = {checkpoint["step"]: checkpoint["metrics"]["valid_loss"] for checkpoint in recorder.checkpoints}
    best_step = min(losses, key=losses.get)
    assert best_step < result.steps == 12  # the run is built so; else this test proves nothing
    assert result.best_step == best_step
    (best,) = [checkpoint for checkpoint in recorder.checkpoints if checkpoint["step"] == best_step]
    shipped = {
        str(path.relative_to(result.adapter_dir)): path.read_bytes()
        for path in result.adapter_dir.rglob("*")
        if path.is_file()
    }
    assert shipped == best["files"]
    assert f"Step: {best_step}." in shipped["README.md"].decode()
