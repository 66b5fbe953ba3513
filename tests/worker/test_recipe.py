"""The recipe, run for real: the tiny Phi-3 trains on the persona data on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import PERSONA_FILE, Recorder, fresh_base, logits, persona_inputs
from worker import hardware
from worker.data import load_tokenized_dataset
from worker.recipe import (
    RecipeInputs,
    TrainingRun,
    build_lora_config,
    build_trainer_args,
    run_recipe,
    train,
)

METRIC_KEYS = {
    "step",
    "total_steps",
    "epoch",
    "train_loss",
    "train_mean_token_accuracy",
    "learning_rate",
    "tokens_per_second",
}

# 40 examples in batches of 8: 5 steps per epoch, 20 in all. Evaluating every 5 steps and logging every 2
# makes the recipe log at the evaluated steps too. The main run also stores a checkpoint every 10 steps.
TRAINING_CONFIG = TrainingConfig(
    learning_rate=2e-2,
    num_train_epochs=4,
    per_device_train_batch_size=8,
    warmup_ratio=0,
    logging_steps=2,
    eval_steps=5,
    seed=7,
)
PEFT_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
CHECKPOINT_METRIC_KEYS = {
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
}
PEFT_CONFIG = PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0)


def recipe_inputs(
    base: Path, output_dir: Path, validation_file: Path | None = None, **overrides
) -> RecipeInputs:
    return persona_inputs(
        base,
        validation_file=validation_file,
        training_config=TRAINING_CONFIG.model_copy(update=overrides),
        peft_config=PEFT_CONFIG,
        output_dir=output_dir,
    )


@pytest.fixture(scope="module")
def validation_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validation") / "validation.jsonl"
    path.write_text("".join(PERSONA_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:6]))
    return path


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def run(
    tiny_model_dir: Path, validation_file: Path, recorder: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> TrainingRun:
    inputs = recipe_inputs(tiny_model_dir, tmp_path_factory.mktemp("attempt"), validation_file, save_steps=10)
    run = train(inputs, recorder)
    run.trainer.model.eval()
    return run


def test_loss_falls(run: TrainingRun, recorder: Recorder) -> None:
    first, last = recorder.events[0]["train_loss"], recorder.events[-1]["train_loss"]
    assert last < first - 1.0
    assert run.result.train_loss == last


def test_metrics_arrive_in_step_order_with_eval_loss_at_evaluated_steps(
    run: TrainingRun, recorder: Recorder
) -> None:
    steps = [event["step"] for event in recorder.events]
    assert steps == [2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20]
    for event in recorder.events:
        assert event.keys() >= METRIC_KEYS
        assert event["total_steps"] == 20
        assert event["tokens_per_second"] > 0
        assert ("eval_loss" in event) == (event["step"] % 5 == 0)
        if "eval_loss" in event:
            assert 0 <= event["eval_mean_token_accuracy"] <= 1
    assert recorder.events[-1]["epoch"] == pytest.approx(4.0)


def test_checkpoints_are_reported_every_save_steps_with_their_metrics(
    run: TrainingRun, recorder: Recorder
) -> None:
    assert [checkpoint["step"] for checkpoint in recorder.checkpoints] == [10, 20]
    events = {event["step"]: event for event in recorder.events}
    for checkpoint in recorder.checkpoints:
        metrics, event = checkpoint["metrics"], events[checkpoint["step"]]
        assert metrics.keys() == CHECKPOINT_METRIC_KEYS
        assert metrics["step"] == checkpoint["step"]
        assert metrics["train_loss"] == event["train_loss"]
        assert metrics["train_mean_token_accuracy"] == event["train_mean_token_accuracy"]
        assert metrics["valid_loss"] == event["eval_loss"]
        assert metrics["valid_mean_token_accuracy"] == event["eval_mean_token_accuracy"]
        assert 0 <= metrics["train_mean_token_accuracy"] <= 1
        assert sorted(checkpoint["files"]) == PEFT_FILES
    first, last = recorder.checkpoints
    assert first["files"]["adapter_model.safetensors"] != last["files"]["adapter_model.safetensors"]
    # The last step's checkpoint is the final adapter.
    final = run.result.adapter_dir / "adapter_model.safetensors"
    assert last["files"]["adapter_model.safetensors"] == final.read_bytes()


def test_result_describes_the_run(run: TrainingRun) -> None:
    result = run.result
    assert not result.cancelled
    assert result.steps == 20
    assert result.best_step is None  # load_best_model_at_end is off
    assert result.formats == ["peft"]
    # Four whole epochs over the file, padding not counted.
    data = load_tokenized_dataset(PERSONA_FILE, run.trainer.processing_class, max_seq_length=2048)
    assert result.trained_tokens == 4 * data.num_tokens


def test_loss_covers_only_the_masked_in_tokens(run: TrainingRun, tokenizer: PreTrainedTokenizerBase) -> None:
    data = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=2048).dataset
    prepared = run.trainer.train_dataset
    assert prepared["input_ids"] == data["input_ids"]
    for ids, mask, labels in zip(data["input_ids"], data["completion_mask"], prepared["labels"], strict=True):
        assert labels == [token if trained else -100 for token, trained in zip(ids, mask, strict=True)]


def test_lora_weights_trained_and_base_weights_untouched(run: TrainingRun, tiny_model_dir: Path) -> None:
    base = fresh_base(tiny_model_dir).state_dict()
    lora_b = 0
    for name, parameter in run.trainer.model.named_parameters():
        if "lora_B" in name:
            lora_b += 1
            assert parameter.abs().sum() > 0, name  # LoRA starts with B = 0
        elif "lora_" not in name:
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(parameter, base[base_name]), name
    assert lora_b == 2 * 4  # qkv, o, gate_up and down projections of both layers


def test_saved_adapter_reproduces_the_trained_model(
    run: TrainingRun, tiny_model_dir: Path, persona_ids: torch.Tensor
) -> None:
    adapter_dir = run.result.adapter_dir
    assert sorted(path.name for path in adapter_dir.iterdir()) == PEFT_FILES
    assert str(tiny_model_dir) in (adapter_dir / "README.md").read_text()

    reloaded = PeftModel.from_pretrained(fresh_base(tiny_model_dir), adapter_dir).eval()
    reloaded_logits = logits(reloaded, persona_ids)
    torch.testing.assert_close(reloaded_logits, logits(run.trainer.model, persona_ids))
    assert not torch.allclose(reloaded_logits, logits(fresh_base(tiny_model_dir), persona_ids), atol=1e-2)


def test_cancelled_job_stops_at_the_step_that_heard_of_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    recorder = Recorder(stop_after=1)
    result = run_recipe(recipe_inputs(tiny_model_dir, tmp_path, logging_steps=1, max_steps=50), recorder)
    assert result.cancelled
    assert result.steps == 1  # should_stop() turned True with step 1's event, as the API's reply does
    assert [event["step"] for event in recorder.events] == [1]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_the_seed_decides_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    def adapter_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        inputs = recipe_inputs(tiny_model_dir, tmp_path / name, max_steps=2, seed=seed)
        return load_file(run_recipe(inputs, Recorder()).adapter_dir / "adapter_model.safetensors")

    first, again, other = (
        adapter_weights("first", 7),
        adapter_weights("again", 7),
        adapter_weights("other", 8),
    )
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def test_the_first_message_says_where_and_how_the_job_trains(recorder: Recorder, run: TrainingRun) -> None:
    info = [(text, data) for level, text, data in recorder.messages if level == "info"]
    assert info[0][0] == "Device cpu (CPU), weights float32, full precision, attention sdpa"
    assert info[1][0].startswith("Estimated memory ")
    peak_text, peak = info[-1]  # measured once training ends
    assert peak_text.startswith("Peak memory ") and peak["peak_memory_bytes"] > 100 * 2**20


def test_trainer_args_fit_the_cpu_unless_set(tmp_path: Path) -> None:
    cpu = hardware.plan("cpu", parameters=10**6)
    args = build_trainer_args(TrainingConfig(), tmp_path, cpu, evaluate=False)
    assert not args.bf16 and not args.fp16
    assert args.use_cpu and args.n_gpu == 0
    assert not args.gradient_checkpointing
    assert args.completion_only_loss
    assert args.eval_strategy == "no"
    assert args.save_strategy == "no"
    assert args.get_warmup_steps(100) == 10  # warmup_ratio 0.1

    args = build_trainer_args(
        TrainingConfig(gradient_checkpointing=True, logging_steps=3, warmup_ratio=0),
        tmp_path,
        cpu,
        evaluate=True,
    )
    assert args.gradient_checkpointing
    assert args.eval_strategy == "steps"
    assert args.eval_steps == 3  # eval_steps defaults to logging_steps
    assert args.get_warmup_steps(100) == 0


def test_lora_config_follows_peft_config() -> None:
    lora = build_lora_config(PeftConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"], use_rslora=True))
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (4, 8, True)
    assert lora.target_modules == {"qkv_proj"}
    assert build_lora_config(PeftConfig()).target_modules == "all-linear"
