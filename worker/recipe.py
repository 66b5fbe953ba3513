"""The LoRA fine-tuning recipe the worker runs for a job, readable top to bottom.

`run_recipe` loads the base model, tokenises the job's files (see `worker.data`), trains a LoRA adapter with
TRL's `SFTTrainer` configured from the job's `TrainingConfig` and `PeftConfig`, reports progress through a
`ProgressReporter` and saves the adapter as safetensors with a short model card. Errors propagate: the task
that calls it turns them into a failed job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

from app.specs import PeftConfig, TrainingConfig
from worker import hardware
from worker.data import load_tokenized_dataset


class ProgressReporter(Protocol):
    def on_metrics(self, metrics: dict) -> None:
        """Called at every logging step with step, total_steps, epoch, train_loss, learning_rate,
        tokens_per_second, and eval_loss when the step was evaluated."""

    def should_stop(self) -> bool:
        """True once the job was cancelled."""


@dataclass
class RecipeInputs:
    base_model: str  # a local directory, or a hub id where the deployment can download
    training_file: Path
    validation_file: Path | None
    training_config: TrainingConfig
    peft_config: PeftConfig
    output_dir: Path  # scratch directory of this attempt


@dataclass
class RecipeResult:
    adapter_dir: Path  # adapter_config.json, adapter_model.safetensors and README.md
    trained_tokens: int
    steps: int
    train_loss: float | None  # the last logged train loss
    cancelled: bool


@dataclass
class TrainingRun:
    """A finished run with its trainer, whose model still holds the trained adapter."""

    trainer: SFTTrainer
    result: RecipeResult


def run_recipe(inputs: RecipeInputs, reporter: ProgressReporter) -> RecipeResult:
    """Train and save a LoRA adapter for one job attempt; what the Celery task calls."""
    return train(inputs, reporter).result


def train(inputs: RecipeInputs, reporter: ProgressReporter) -> TrainingRun:
    """Run the whole recipe and keep the trainer, for callers that inspect the trained model."""
    config = inputs.training_config
    model, tokenizer = load_base_model(inputs.base_model, for_training=True, bf16=config.bf16)
    train_data = load_tokenized_dataset(
        inputs.training_file,
        tokenizer,
        max_seq_length=config.max_seq_length,
        train_on_inputs=config.train_on_inputs,
    )
    validation_data = None
    if inputs.validation_file is not None:
        validation_data = load_tokenized_dataset(
            inputs.validation_file,
            tokenizer,
            max_seq_length=config.max_seq_length,
            train_on_inputs=config.train_on_inputs,
        )
    progress = ReporterCallback(reporter)
    trainer = build_trainer(
        model,
        tokenizer,
        inputs,
        train_data.dataset,
        validation_data.dataset if validation_data else None,
        progress,
    )
    trainer.train()

    train_loss = last_train_loss(trainer)
    adapter_dir = save_adapter(trainer.model, inputs.output_dir / "adapter", inputs, train_loss)
    result = RecipeResult(
        adapter_dir=adapter_dir,
        trained_tokens=trainer.state.num_input_tokens_seen,
        steps=trainer.state.global_step,
        train_loss=train_loss,
        cancelled=progress.cancelled,
    )
    return TrainingRun(trainer=trainer, result=result)


def load_base_model(
    name_or_path: str, *, for_training: bool, bf16: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer for the hardware at hand: bf16 + FlashAttention-2 or SDPA on a GPU,
    fp32 + SDPA on CPU. `bf16=None` picks bf16 where the GPU supports it."""
    device = hardware.training_device()
    dtype = hardware.model_dtype(device, hardware.use_bf16(bf16))
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=hardware.attention_implementation(device, dtype)
    ).to(device)
    if for_training:
        model.config.use_cache = False  # the cache only serves generation and conflicts with checkpointing
    else:
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def build_lora_config(peft_config: PeftConfig) -> LoraConfig:
    """The `peft.LoraConfig` of a job; PeftConfig's fields are named after LoraConfig's."""
    return LoraConfig(**peft_config.model_dump())


def build_trainer_args(config: TrainingConfig, output_dir: Path, *, evaluate: bool) -> SFTConfig:
    """The trainer arguments of a job; precision and checkpointing follow the hardware unless set."""
    return SFTConfig(
        output_dir=str(output_dir),
        # Seeds everything: SFTTrainer seeds before it initialises the LoRA weights, Trainer before training.
        seed=config.seed,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        # Transformers 5 dropped warmup_ratio: a warmup_steps below 1 is the fraction of steps.
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_length=config.max_seq_length,  # the data is truncated already; SFTConfig's 1024 would cut more
        # The dataset is already tokenised; TRL applies its completion_mask column only when this is True.
        completion_only_loss=True,
        # SFTConfig defaults both to on, which makes CPU training many times slower. Transformers 5 renamed
        # gradient checkpointing to activation checkpointing; the new name wins over TRL's default.
        bf16=hardware.use_bf16(config.bf16),
        activation_checkpointing=hardware.use_gradient_checkpointing(config.gradient_checkpointing),
        activation_checkpointing_kwargs=config.gradient_checkpointing_kwargs,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(config.eval_steps or config.logging_steps) if evaluate else None,
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",  # feeds trained_tokens and tokens_per_second
        report_to="none",
        disable_tqdm=True,  # progress goes to the reporter, not to the worker's log
        dataloader_pin_memory=hardware.training_device().type == "cuda",
        log_level=config.log_level or "passive",
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: RecipeInputs,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    progress: ReporterCallback,
) -> SFTTrainer:
    """An SFTTrainer that wraps `model` in a fresh LoRA adapter and trains on the tokenised datasets."""
    args = build_trainer_args(
        inputs.training_config, inputs.output_dir / "trainer", evaluate=eval_dataset is not None
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_lora_config(inputs.peft_config),
        callbacks=[progress],
    )


class ReporterCallback(TrainerCallback):
    """Turns the trainer's logs into `reporter.on_metrics` events and stops training once cancelled.

    One event per logged step; when that step is also evaluated the event waits for, and carries, eval_loss.
    """

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self.cancelled = False
        self._pending: dict | None = None
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter.should_stop():
            self.cancelled = True
            control.should_training_stop = True
        # Log at the last step, planned or cancelled, so the final loss is reported, and at every evaluation
        # so each eval_loss rides on an event. DefaultFlowCallback runs first and sets should_evaluate.
        if self.cancelled or state.global_step >= state.max_steps or control.should_evaluate:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # evaluation logs are merged in on_evaluate; the final summary is not a step
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        event = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            "train_loss": logs["loss"],
            "learning_rate": logs["learning_rate"],
            "tokens_per_second": (tokens - self._last_tokens) / max(now - self._last_time, 1e-9),
        }
        self._last_time, self._last_tokens = now, tokens
        if control.should_evaluate:
            self._pending = event
        else:
            self.reporter.on_metrics(event)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        event, self._pending = self._pending, None
        self.reporter.on_metrics({**event, "eval_loss": metrics["eval_loss"]})


def last_train_loss(trainer: SFTTrainer) -> float | None:
    """The train loss of the last logging step, None if no step was logged."""
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses[-1] if losses else None


def save_adapter(model: PeftModel, adapter_dir: Path, inputs: RecipeInputs, train_loss: float | None) -> Path:
    """Save the adapter as safetensors with a model card; the base model's weights are not copied."""
    model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").write_text(model_card(inputs, train_loss), encoding="utf-8")
    return adapter_dir


def model_card(inputs: RecipeInputs, train_loss: float | None) -> str:
    """A short README.md: what the adapter applies to and how it was trained."""
    final_loss = "not logged" if train_loss is None else f"{train_loss:.4f}"
    training = json.dumps(inputs.training_config.model_dump(exclude_none=True), indent=2)
    lora = json.dumps(inputs.peft_config.model_dump(exclude_none=True), indent=2)
    return (
        f"---\nbase_model: {inputs.base_model}\nlibrary_name: peft\ntags: [lora, phitune]\n---\n\n"
        f"# LoRA adapter for {inputs.base_model}\n\n"
        "Fine-tuned by phitune with TRL's SFTTrainer.\n\n"
        f"Final train loss: {final_loss}\n\n"
        f"## Training config\n\n```json\n{training}\n```\n\n"
        f"## LoRA config\n\n```json\n{lora}\n```\n"
    )
