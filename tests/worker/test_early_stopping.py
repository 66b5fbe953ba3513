"""Early stopping: the run stops once eval_loss has not improved for early_stopping_patience evaluations, says
where and why, and ships the best step's adapter; a run resumed in between stops where it would have.

As in test_best_checkpoint, the run trains on the pirate persona and evaluates on plain support replies: the
eval loss falls, then rises as the pirate talk takes over, long before max_steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, persona_inputs
from worker.recipe import RecipeInputs, RecipeResult, run_recipe

PATIENCE = 2
TRAINING_CONFIG = TrainingConfig(
    learning_rate=2e-2,
    max_steps=40,
    per_device_train_batch_size=8,
    warmup_ratio=0,
    lr_scheduler_type="constant",
    logging_steps=2,
    eval_steps=2,  # a checkpoint at every evaluation: load_best_model_at_end is implied
    seed=7,
    early_stopping_patience=PATIENCE,
)


def inputs(base: Path, validation: Path, output_dir: Path, **fields) -> RecipeInputs:
    return persona_inputs(
        base,
        validation_file=validation,
        training_config=TRAINING_CONFIG,
        peft_config=PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0),
        output_dir=output_dir,
        **fields,
    )


def expected_stop(eval_losses: dict[int, float]) -> int | None:
    """The first evaluation after PATIENCE evaluations in a row that beat no earlier one (threshold 0)."""
    best, without = None, 0
    for step in sorted(eval_losses):
        loss = eval_losses[step]
        without = 0 if best is None or loss < best else without + 1
        best = loss if best is None else min(best, loss)
        if without >= PATIENCE:
            return step
    return None


def stop_messages(recorder: Recorder) -> list[tuple[str, dict]]:
    return [(text, data) for _, text, data in recorder.messages if text.startswith("Early stopping")]


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_model_dir: Path, plain_replies: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RecipeResult, Recorder]:
    recorder = Recorder()
    result = run_recipe(inputs(tiny_model_dir, plain_replies, tmp_path_factory.mktemp("whole")), recorder)
    return result, recorder


def test_training_stops_after_patience_evaluations_without_improvement(uninterrupted) -> None:
    result, recorder = uninterrupted
    eval_losses = {event["step"]: event["eval_loss"] for event in recorder.events if "eval_loss" in event}
    stop = expected_stop(eval_losses)
    assert stop is not None and stop < TRAINING_CONFIG.max_steps  # the run is built so
    assert result.steps == stop == max(event["step"] for event in recorder.events)
    best_step = min(eval_losses, key=lambda step: (eval_losses[step], step))
    ((text, data),) = stop_messages(recorder)
    assert text == (
        f"Early stopping at step {stop}: eval_loss did not improve by more than 0 for {PATIENCE} evaluations "
        f"(best {eval_losses[best_step]:.4f} at step {best_step})"
    )
    assert (data["step"], data["best_step"]) == (stop, best_step)


def test_the_best_step_ships(uninterrupted) -> None:
    result, recorder = uninterrupted
    losses = {checkpoint["step"]: checkpoint["metrics"]["valid_loss"] for checkpoint in recorder.checkpoints}
    best_step = min(losses, key=losses.get)
    assert result.best_step == best_step < result.steps
    (best,) = [checkpoint for checkpoint in recorder.checkpoints if checkpoint["step"] == best_step]
    shipped = {
        str(path.relative_to(result.adapter_dir)): path.read_bytes()
        for path in result.adapter_dir.rglob("*")
        if path.is_file()
    }
    assert shipped == best["files"]


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(
    uninterrupted, tiny_model_dir: Path, plain_replies: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Handed back one step before it would stop, with evaluations since the best already counted: the
    resumed attempt counts them again from the eval losses its state holds."""
    whole, whole_recorder = uninterrupted
    first = Recorder(hand_back_at=whole.steps - 1)
    paused = run_recipe(inputs(tiny_model_dir, plain_replies, tmp_path_factory.mktemp("first")), first)
    assert paused.handed_back == "pause" and stop_messages(first) == []
    recorder = Recorder()
    state = first.states[whole.steps - 1]
    resumed = run_recipe(
        inputs(tiny_model_dir, plain_replies, tmp_path_factory.mktemp("resumed"), resume_from=state), recorder
    )
    assert (resumed.steps, resumed.best_step) == (whole.steps, whole.best_step)
    assert stop_messages(recorder) == stop_messages(whole_recorder)
    shipped = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert shipped == (whole.adapter_dir / "adapter_model.safetensors").read_bytes()
