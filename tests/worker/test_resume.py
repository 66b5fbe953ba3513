"""Exact resume: a run interrupted at a step and continued from its resume state ends where the
uninterrupted run ends — same LoRA weights, same final train loss, one continuous step count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import PERSONA_FILE, Recorder, persona_inputs
from worker import resume_state
from worker.recipe import RecipeInputs, TrainingRun, train

# 40 examples in batches of 8: 5 steps an epoch, 15 in all. Dropout on, so the RNG state must be restored
# too; a resume state every 4 steps; the interruption at step 6 falls mid-epoch, between two of them.
TRAINING_CONFIG = TrainingConfig(
    learning_rate=1e-2,
    num_train_epochs=3,
    per_device_train_batch_size=8,
    warmup_ratio=0.1,
    logging_steps=2,
    save_steps=4,
    seed=11,
)
PEFT_CONFIG = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1)


def inputs(base: Path, output_dir: Path, **fields) -> RecipeInputs:
    return persona_inputs(
        base, training_config=TRAINING_CONFIG, peft_config=PEFT_CONFIG, output_dir=output_dir, **fields
    )


def lora_weights(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in run.trainer.model.named_parameters()
        if "lora_" in name
    }


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingRun, Recorder]:
    recorder = Recorder()
    return train(inputs(tiny_model_dir, tmp_path_factory.mktemp("whole")), recorder), recorder


@pytest.fixture(scope="module")
def interrupted(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingRun, Recorder]:
    recorder = Recorder(hand_back_at=6)
    return train(inputs(tiny_model_dir, tmp_path_factory.mktemp("first")), recorder), recorder


def test_a_state_every_save_steps_and_one_at_the_hand_back(uninterrupted, interrupted):
    assert sorted(uninterrupted[1].states) == [4, 8, 12]
    run, recorder = interrupted
    assert run.result.handed_back == "pause" and run.result.adapter_dir is None
    assert run.result.steps == 6 and sorted(recorder.states) == [4, 6]
    state = recorder.states[6]
    trainer_files = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]
    for name in [*trainer_files, "adapter_model.safetensors"]:
        assert (state / resume_state.TRAINER_DIR / name).is_file(), name
    assert (state / resume_state.MANIFEST_FILE).is_file()
    assert resume_state.read_manifest(state).step == 6


def test_resumed_run_ends_with_the_uninterrupted_weights_and_loss(
    tiny_model_dir, tmp_path, uninterrupted, interrupted
):
    whole, whole_events = uninterrupted[0], uninterrupted[1].events
    recorder = Recorder()
    resumed = train(inputs(tiny_model_dir, tmp_path, resume_from=interrupted[1].states[6]), recorder)
    assert resumed.result.steps == whole.result.steps == 15
    assert [event["step"] for event in recorder.events][0] == 8  # the step count continues
    expected, actual = lora_weights(whole), lora_weights(resumed)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=1e-5, atol=1e-7), name
    assert resumed.result.train_loss == pytest.approx(whole.result.train_loss, rel=1e-5)
    assert resumed.result.trained_tokens == whole.result.trained_tokens
    # The tail of the loss curve is the uninterrupted run's: one continuous curve.
    tail = {event["step"]: event["train_loss"] for event in whole_events if event["step"] > 6}
    assert {event["step"]: event["train_loss"] for event in recorder.events} == pytest.approx(tail, rel=1e-5)
    # And the interrupted run's LoRA weights did move away from the resumed ones before continuing.
    first = lora_weights(interrupted[0])
    assert any(not torch.allclose(first[name], actual[name]) for name in first)


def test_resume_keeps_the_best_checkpoint_so_far(tiny_model_dir, tmp_path_factory):
    """With load_best_model_at_end the best adapter travels in the state: the resumed run ships the same step
    and weights as the uninterrupted one, and the trainer loads only the one adapter it trains."""
    validation = tmp_path_factory.mktemp("validation") / "validation.jsonl"
    validation.write_text("".join(PERSONA_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:6]))
    config = TRAINING_CONFIG.model_copy(update={"load_best_model_at_end": True, "learning_rate": 5e-2})

    def run(recorder: Recorder, **fields) -> TrainingRun:
        return train(
            persona_inputs(
                tiny_model_dir,
                validation_file=validation,
                training_config=config,
                peft_config=PEFT_CONFIG,
                output_dir=tmp_path_factory.mktemp("run"),
                **fields,
            ),
            recorder,
        )

    whole = run(Recorder())
    first = Recorder(hand_back_at=9)
    run(first)
    assert (first.states[9] / resume_state.BEST_DIR / "adapter_model.safetensors").is_file()
    resumed = run(Recorder(), resume_from=first.states[9])
    assert list(resumed.trainer.model.peft_config) == ["default"]
    assert resumed.result.best_step == whole.result.best_step is not None
    expected = load_file(whole.result.adapter_dir / "adapter_model.safetensors")
    actual = load_file(resumed.result.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=1e-5, atol=1e-7), name


def test_a_state_is_loaded_only_whole_and_only_by_its_own_job(interrupted, tmp_path):
    state = interrupted[1].states[6]
    archive = tmp_path / "state.tar"
    sha256 = resume_state.pack(state, archive)
    mine = resume_state.read_manifest(state).fingerprint
    manifest = resume_state.unpack(archive, tmp_path / "good", sha256=sha256, expected_fingerprint=mine)
    assert manifest.step == 6 and (tmp_path / "good" / resume_state.TRAINER_DIR / "optimizer.pt").is_file()

    with pytest.raises(resume_state.InvalidState, match="another base model or recipe"):
        resume_state.unpack(archive, tmp_path / "foreign", sha256=sha256, expected_fingerprint="0" * 64)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:-4096])
    with pytest.raises(resume_state.InvalidState, match="sha256 does not match"):
        resume_state.unpack(truncated, tmp_path / "cut", sha256=sha256, expected_fingerprint=mine)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar archive" * 100)
    with pytest.raises(resume_state.InvalidState, match="cannot be read"):
        resume_state.unpack(
            garbage, tmp_path / "garbage", sha256=resume_state.file_sha256(garbage), expected_fingerprint=mine
        )


def test_the_fingerprint_ignores_where_the_model_lives_but_not_what_it_is(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    mine = resume_state.fingerprint(config, TRAINING_CONFIG, PEFT_CONFIG)
    moved = {**config, "_name_or_path": "/elsewhere", "transformers_version": "9.9.9"}
    assert resume_state.fingerprint(moved, TRAINING_CONFIG, PEFT_CONFIG) == mine
    assert resume_state.fingerprint({**config, "hidden_size": 128}, TRAINING_CONFIG, PEFT_CONFIG) != mine
    assert resume_state.fingerprint(config, TRAINING_CONFIG, PEFT_CONFIG.model_copy(update={"r": 8})) != mine
