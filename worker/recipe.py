"""The LoRA fine-tuning recipe the worker runs for a job, readable top to bottom.

`run_recipe` loads the base model (quantised for QLoRA, see `worker.quantization`), tokenises the job's files
(see `worker.data`), adds LoRA layers (PEFT's, or loralib's, see `worker.loralib_backend`), trains them with
TRL's `SFTTrainer` configured from the job's `TrainingConfig` and `PeftConfig`, reports progress and
checkpoints through a `ProgressReporter` and saves the adapter as safetensors with a short model card.
Along the way it hands the reporter resume states (see `worker.resume_state`), and continues exactly from
one when `RecipeInputs.resume_from` is given; otherwise, with `RecipeInputs.init_from`, training starts from
the LoRA weights of a previous adapter (`training_config.init_from`). Errors propagate: the task that calls
it turns them into a failed job.

The training method is a `TrainingMethod`: supervised (`SUPERVISED`, SFTTrainer, here) or preference
(`worker.dpo`, DPOTrainer); everything else (model loading, events, checkpoints, cancel, pause, resume, early
stopping, the adapter saved) is this module's, for both.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    EarlyStoppingCallback,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from app.specs import RECIPE_FIELDS, DpoConfig, PeftConfig, TrainingConfig, fit_to_model
from worker import hardware, lm_head, loralib_backend, memory_estimate, resume_state, trackers
from worker.adapter_archive import (
    LORALIB_DIR,
    LORALIB_STATE_DICT_FILE,
    PEFT_UNAVAILABLE_FILE,
    PEFT_WEIGHTS_FILE,
)
from worker.data import TokenizedDataset, load_tokenized_dataset
from worker.hardware import DeviceSetting, HardwarePlan
from worker.loralib_backend import LoralibConfig
from worker.memory_estimate import measured_peak, reset_peak
from worker.model_loader import count_parameters, load_base_model
from worker.packed_attention import use_packed_sdpa
from worker.quantization import describe_quantization, prepare_quantized_for_training
from worker.ranks import all_ranks_here, rank_zero_decides


class ProgressReporter(Protocol):
    def message(self, text: str, *, level: str = "info", data: dict | None = None) -> None:
        """A message event for the job: where it trains, its peak memory, warnings."""

    def on_metrics(self, metrics: dict) -> None:
        """Called at every logging step with step, total_steps, epoch, train_loss, train_mean_token_accuracy,
        learning_rate, tokens_per_second, and eval_loss and eval_mean_token_accuracy when the step was
        evaluated."""

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict) -> None:
        """Called at every checkpoint with the step's adapter, laid out as the final one, and metrics step,
        train_loss, train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy (None without a
        validation file). The directory may be deleted once the call returns."""

    def should_stop(self) -> bool:
        """True once the job was cancelled."""

    def hand_back(self) -> str | None:
        """ "pause" or "preempt" once the attempt must save its state and stop (the job was paused, or the
        worker was told to shut down); None to go on."""

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        """Called with a complete resume state of `step` (see `worker.resume_state`). The directory may be
        deleted once the call returns."""


@dataclass
class RecipeInputs:
    base_model: str  # a local directory, or a hub id where the deployment can download
    training_file: Path
    validation_file: Path | None
    training_config: TrainingConfig
    peft_config: PeftConfig
    output_dir: Path  # scratch directory of this attempt
    resume_from: Path | None = None  # an unpacked resume state of this job (checked by resume_state.unpack)
    # The unpacked adapter of training_config.init_from (checked by adapter_archive.extract_adapter), in the
    # format of the job's backend: its LoRA weights are where training starts, unless resume_from is given.
    init_from: Path | None = None
    resume_state_seconds: float | None = None  # a resume state at least this often, besides every save_steps
    device: DeviceSetting = "auto"  # PHITUNE_DEVICE
    tracking: trackers.Tracking | None = None  # the experiment trackers it reports to (worker.trackers)
    dpo: DpoConfig | None = None  # a preference job's DPO settings (worker.dpo trains it); None: supervised


@dataclass
class RecipeResult:
    # README.md; the PEFT files (adapter_config.json, adapter_model.safetensors) where a PEFT form exists,
    # else PEFT_UNAVAILABLE.txt; loralib/ for backend loralib. None when the attempt was handed back.
    adapter_dir: Path | None
    trained_tokens: int
    steps: int
    train_loss: float | None  # the last logged train loss
    cancelled: bool
    best_step: int | None  # with load_best_model_at_end, the step whose adapter adapter_dir holds
    formats: list[str]  # the download formats adapter_dir holds: "peft" and/or "loralib"
    handed_back: str | None = None  # "pause" or "preempt": stopped after saving a resume state


@dataclass
class TrainingRun:
    """A finished run with its trainer, whose model still holds the trained adapter."""

    trainer: Trainer
    result: RecipeResult


class TrainingMethod(Protocol):
    """What differs between training methods: the data, the trainer and the extra metrics it logs."""

    preference: bool  # trains preference (DPO) jobs, those with RecipeInputs.dpo
    trainer_name: str  # the TRL trainer it trains with, as messages name it
    metrics: Mapping[str, str]  # extra trainer log keys → metrics event names (prefixed train_ and eval_)

    def ready(self, model: PreTrainedModel, config: TrainingConfig) -> None:
        """Adjust the loaded base model for this method's batches."""

    def load(self, path: Path, tokenizer: PreTrainedTokenizerBase, config: TrainingConfig) -> Any:
        """The tokenised file: an object with `dataset` and the counts `describe` reports."""

    def batch_shape(self, data: Any) -> tuple[int, int]:
        """The longest row of `data` in tokens, and the rows a batch holds per example."""

    def build_trainer(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        inputs: RecipeInputs,
        plan: HardwarePlan,
        train_dataset: Dataset,
        eval_dataset: Dataset | None,
        callbacks: list[TrainerCallback],
        *,
        checkpointing: bool | None,
    ) -> Trainer:
        """The trainer of `model`'s LoRA weights; with backend peft it wraps `model` in the job's adapter."""

    def describe(self, data: Any, trainer: Trainer, config: TrainingConfig) -> tuple[str, dict]:
        """The event that says what became of the training examples."""


class Supervised:
    """Supervised fine-tuning with TRL's SFTTrainer, on chat, prompt/completion and text files."""

    preference = False
    trainer_name = "SFTTrainer"
    metrics: Mapping[str, str] = {}

    def ready(self, model: PreTrainedModel, config: TrainingConfig) -> None:
        if config.packing or config.padding_free:
            use_packed_sdpa(model)  # the examples of a row attend each to itself, not through a mask

    def load(
        self, path: Path, tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> TokenizedDataset:
        return load_tokenized_dataset(
            path, tokenizer, max_seq_length=config.max_seq_length, train_on_inputs=config.train_on_inputs
        )

    def batch_shape(self, data: TokenizedDataset) -> tuple[int, int]:
        return longest_example(data), 1

    def build_trainer(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        inputs: RecipeInputs,
        plan: HardwarePlan,
        train_dataset: Dataset,
        eval_dataset: Dataset | None,
        callbacks: list[TrainerCallback],
        *,
        checkpointing: bool | None,
    ) -> Trainer:
        return build_trainer(
            model,
            tokenizer,
            inputs,
            plan,
            train_dataset,
            eval_dataset,
            callbacks,
            checkpointing=checkpointing,
        )

    def describe(self, data: TokenizedDataset, trainer: Trainer, config: TrainingConfig) -> tuple[str, dict]:
        return describe_data(data, trainer, config)


SUPERVISED = Supervised()


def run_recipe(inputs: RecipeInputs, reporter: ProgressReporter) -> RecipeResult:
    """Train and save a LoRA adapter for one supervised job attempt; what the Celery task calls."""
    return train(inputs, reporter).result


def train(
    inputs: RecipeInputs, reporter: ProgressReporter, method: TrainingMethod = SUPERVISED
) -> TrainingRun:
    """Run the whole recipe with `method` and keep the trainer, for callers that inspect the trained model."""
    if inputs.training_config.load_best_model_at_end and inputs.validation_file is None:
        raise ValueError("training_config.load_best_model_at_end needs a validation_file")
    if method.preference != (inputs.dpo is not None):
        raise ValueError(f"{method.trainer_name} does not train this job's method")
    config, peft_config = inputs.training_config, inputs.peft_config
    # The API ran the same check on the same config.json at creation (and fitted max_seq_length then); the
    # worker's copy of the model may differ from the API's, so it runs again before any weight is read.
    fit_to_model(config, peft_config, PretrainedConfig.get_config_dict(inputs.base_model)[0])
    architecture = AutoConfig.from_pretrained(inputs.base_model)
    model_config = architecture.to_dict()
    plan = hardware.plan(inputs.device, parameters=count_parameters(architecture), bf16=config.bf16)
    if plan.fallback_warning:
        reporter.message(plan.fallback_warning, level="warn")
    # Said before loading, so that a job that runs out of memory while loading has said where it ran.
    reporter.message(
        f"{plan.describe()}{describe_quantization(peft_config.quantization, plan.quantized_compute_dtype)}"
    )
    model, tokenizer = load_base_model(
        inputs.base_model, for_training=True, plan=plan, quantization=peft_config.quantization
    )
    method.ready(model, config)
    train_data = method.load(inputs.training_file, tokenizer, config)
    validation_data = None
    if inputs.validation_file is not None:
        validation_data = method.load(inputs.validation_file, tokenizer, config)
    prepared = prepare_model(model, inputs)
    longest, rows_per_example = method.batch_shape(train_data)
    checkpointing = memory_estimate.decide_checkpointing(
        config.gradient_checkpointing,
        plan.device,
        estimate_memory(
            prepared, inputs, plan, architecture, longest=longest, rows_per_example=rows_per_example
        ),
        memory_estimate.free_memory(plan.device),
    )
    reporter.message(checkpointing.describe(), data=checkpointing.figures())
    progress = ReporterCallback(reporter, method.metrics)
    checkpoints = CheckpointCallback(
        reporter,
        save=lambda model, directory, metrics: save_adapter(
            model, directory, inputs, step=metrics["step"], train_loss=metrics["train_loss"]
        ),
        directory=inputs.output_dir / "checkpoints",
        interval=config.checkpoint_interval(),
        evaluate=validation_data is not None,
        keep_best=config.load_best_model_at_end,
    )
    resumed_step = 0
    if inputs.resume_from is not None:
        manifest = resume_state.read_manifest(inputs.resume_from)
        checkpoints.restore(manifest, inputs.resume_from)
        resumed_step = manifest.step
    states = ResumeStateCallback(
        reporter,
        checkpoints,
        fingerprint=state_fingerprint(inputs, model_config),
        interval=config.checkpoint_interval(),
        seconds=inputs.resume_state_seconds,
    )
    callbacks: list[TrainerCallback] = [progress, checkpoints, states]
    early_stopping = None
    if config.early_stopping_patience:
        early_stopping = EarlyStopping(
            checkpoints, config.early_stopping_patience, config.early_stopping_threshold
        )
        callbacks.append(early_stopping)
    trainer = method.build_trainer(
        prepared,
        tokenizer,
        inputs,
        plan,
        train_data.dataset,
        validation_data.dataset if validation_data else None,
        callbacks,
        checkpointing=checkpointing.enabled,
    )
    text, figures = method.describe(train_data, trainer, config)
    reporter.message(text, data=figures)
    if trainer.args.n_gpu > 1:  # the trainer would wrap the model in nn.DataParallel across them
        raise hardware.DeviceUnavailable(
            f"{trainer.args.n_gpu} GPUs are visible to this worker; pin it to one (phitune worker --gpu N)"
        )
    if inputs.init_from is not None and inputs.resume_from is None:  # a resume state holds newer weights
        loaded = load_initial_adapter(trained_model(trainer), inputs.init_from, peft_config.backend)
        reporter.message(f"Training starts from the LoRA weights of {config.init_from} ({loaded} tensors)")
    if plan.mixed_precision == "fp16":
        # fp16 autocast scales the loss, and the scaler unscales only fp32 gradients: TRL leaves QLoRA's LoRA
        # weights in bf16, which must train in fp32 here.
        for parameter in trained_model(trainer).parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    reset_peak(plan.device)
    with trackers.reporting(inputs.tracking, trainer, reporter, resumed_step=resumed_step) as runs:
        trainer.train(
            resume_from_checkpoint=str(inputs.resume_from / resume_state.TRAINER_DIR)
            if inputs.resume_from
            else None
        )
        runs.ended(interrupted=states.handed_back is not None or progress.cancelled)

    text, figures = measured_peak(plan.device)
    reporter.message(text, data=figures)
    steps = trainer.state.global_step
    train_loss = last_train_loss(trainer)
    stopped_early = early_stopping.describe() if early_stopping else None
    if stopped_early is not None and not progress.cancelled:
        text, figures = stopped_early
        reporter.message(text, data=figures)
    # Training that stopped early at the step it was handed back at is over: it ships, not resumes.
    handed_back = None if stopped_early else states.handed_back
    if handed_back is not None:
        result = RecipeResult(
            adapter_dir=None,
            trained_tokens=trainer.state.num_input_tokens_seen,
            steps=steps,
            train_loss=train_loss,
            cancelled=False,
            best_step=None,
            formats=[],
            handed_back=handed_back,
        )
        return TrainingRun(trainer=trainer, result=result)
    if not trainer.is_world_process_zero():  # rank 0 of a multi-process job ships the adapter
        result = RecipeResult(
            None, trainer.state.num_input_tokens_seen, steps, train_loss, progress.cancelled, None, []
        )
        return TrainingRun(trainer=trainer, result=result)
    adapter_dir = inputs.output_dir / "adapter"
    final_eval_loss = checkpoints.eval_losses.get(steps)
    best = checkpoints.best
    best_step: int | None
    if best is not None and (final_eval_loss is None or best.metrics["valid_loss"] <= final_eval_loss):
        best.directory.rename(adapter_dir)  # on a tie the earlier step wins
        best_step, formats = best.step, best.formats
    else:
        formats = save_adapter(trained_model(trainer), adapter_dir, inputs, step=steps, train_loss=train_loss)
        best_step = steps if config.load_best_model_at_end and final_eval_loss is not None else None
    result = RecipeResult(
        adapter_dir=adapter_dir,
        trained_tokens=trainer.state.num_input_tokens_seen,
        steps=steps,
        train_loss=train_loss,
        cancelled=progress.cancelled,
        best_step=best_step,
        formats=formats,
    )
    return TrainingRun(trainer=trainer, result=result)


def state_fingerprint(inputs: RecipeInputs, model_config: dict | None = None) -> str:
    """The fingerprint of the resume states this job's attempts write and accept."""
    if model_config is None:
        model_config = AutoConfig.from_pretrained(inputs.base_model).to_dict()
    return resume_state.fingerprint(model_config, inputs.training_config, inputs.peft_config)


def estimate_memory(
    model: PreTrainedModel,
    inputs: RecipeInputs,
    plan: HardwarePlan,
    architecture: PretrainedConfig,
    *,
    longest: int,
    rows_per_example: int = 1,
) -> memory_estimate.MemoryEstimate:
    """The job's estimated device memory (`worker.memory_estimate`) without gradient checkpointing, for
    `model` as `prepare_model` left it; micro-batches of packed rows of max_seq_length tokens, or of examples
    as long as the `longest`, `rows_per_example` rows each (a preference pair is two)."""
    config = inputs.training_config
    return memory_estimate.estimate_training_memory(
        model,
        trained_parameters=lora_parameter_count(model, inputs.peft_config),
        batch_size=config.per_device_train_batch_size * rows_per_example,
        sequence_length=config.max_seq_length if config.packing else min(longest, config.max_seq_length),
        hidden_size=architecture.hidden_size,
        layers=architecture.num_hidden_layers,
        vocab_size=architecture.vocab_size,
        half_precision=plan.mixed_precision is not None,
        checkpointing=False,
    )


def lora_parameter_count(model: nn.Module, peft_config: PeftConfig) -> int:
    """The weights LoRA trains in `model`: loralib's are in the model already; PEFT's, added later by the
    trainer, are r · (in + out) per adapted linear layer (any linear layer but the output one for
    "all-linear", else those named by target_modules)."""
    if peft_config.backend == "loralib":
        return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    targets = peft_config.target_modules
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:  # bitsandbytes' layers are nn.Linear too
            continue
        if targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets):
            count += peft_config.r * (module.in_features + module.out_features)
    return count


def longest_example(data: TokenizedDataset) -> int:
    return max(len(ids) for ids in data.dataset["input_ids"])


def describe_data(data: TokenizedDataset, trainer: Trainer, config: TrainingConfig) -> tuple[str, dict]:
    """What became of the training examples: packed into how many rows, and what max_seq_length cut."""
    examples = len(data.dataset)
    figures = {
        "examples": examples,
        "tokens": data.num_tokens,
        "truncated_tokens": data.num_truncated_tokens,
        "truncated_trained_tokens": data.num_truncated_trained_tokens,
        "dropped_examples": data.num_dropped,
    }
    if config.packing:
        rows = len(prepared_dataset(trainer))
        figures["packed_rows"] = rows
        layout = (
            f"Packed {examples} training examples ({data.num_tokens} tokens) into {rows} rows of up to "
            f"{config.max_seq_length} tokens, {data.num_tokens / (rows * config.max_seq_length):.0%} filled"
        )
    else:
        padding = "without padding" if config.padding_free else "padded"
        layout = f"{examples} training examples ({data.num_tokens} tokens), batched {padding}"
        if config.group_by_length:
            layout += " by similar length"
    cut = (
        f"max_seq_length={config.max_seq_length} cut {data.num_truncated_tokens} tokens "
        f"({data.num_truncated_trained_tokens} trained)"
    )
    if data.num_dropped:
        cut += f" and dropped {data.num_dropped} examples left with no trained token"
    return f"{layout}; {cut}", figures


def prepared_dataset(trainer: Trainer) -> Dataset:
    """The training set as the trainer prepared it (labelled, packed)."""
    if not isinstance(trainer.train_dataset, Dataset):
        raise RuntimeError("the trainer has no map-style training set")
    return trainer.train_dataset


def prepare_model(model: PreTrainedModel, inputs: RecipeInputs) -> PreTrainedModel:
    """Ready the base model for its LoRA backend. SFTTrainer adds PEFT's layers itself; loralib's are added
    here, seeded as SFTTrainer seeds PEFT's; QLoRA's quantised base is frozen and partly upcast."""
    peft_config = inputs.peft_config
    if peft_config.backend == "loralib":
        set_seed(inputs.training_config.seed)
        return loralib_backend.prepare_for_training(model, LoralibConfig.from_peft_config(peft_config))
    if peft_config.quantization is not None:
        return prepare_quantized_for_training(model)
    return model


def load_initial_adapter(model: nn.Module, adapter_dir: Path, backend: str) -> int:
    """Copy the adapter the job continues from (unpacked in `adapter_dir`, in the format of `backend`) into
    `model`'s LoRA layers (PEFT's active adapter), which train on from it; returns how many tensors it holds.
    ValueError unless it fills every LoRA weight and nothing else (the API gave the job the adapter's LoRA
    settings); a tensor of another shape is a RuntimeError."""
    trained = "lora_"
    if backend == "loralib":
        weights = load_file(adapter_dir / LORALIB_STATE_DICT_FILE)
        result = model.load_state_dict(weights, strict=False)
    else:
        weights = load_file(adapter_dir / PEFT_WEIGHTS_FILE)
        result = set_peft_model_state_dict(model, weights)
        # The weights of the adapter it fills: a DPO job's model also holds its reference adapter ("ref").
        trained = f".{getattr(model, 'active_adapter', 'default')}."
    unfilled = [name for name in result.missing_keys if "lora_" in name and trained in name]
    if unfilled or result.unexpected_keys:
        raise ValueError(
            "the adapter this job continues from does not fit its LoRA layers: "
            f"{len(unfilled)} LoRA weights left unset, {len(result.unexpected_keys)} tensors of no layer "
            f"({', '.join([*unfilled, *result.unexpected_keys][:3])})"
        )
    return len(weights)


def build_lora_config(peft_config: PeftConfig) -> LoraConfig:
    """The `peft.LoraConfig` of a job: PeftConfig's fields, but the RECIPE_FIELDS, are LoraConfig's."""
    return LoraConfig(**peft_config.model_dump(exclude=set(RECIPE_FIELDS)))


def build_trainer_args(
    config: TrainingConfig,
    output_dir: Path,
    plan: HardwarePlan,
    *,
    evaluate: bool,
    checkpointing: bool | None = None,
) -> SFTConfig:
    """The SFTTrainer arguments of a job: `trainer_arguments` and how its examples are batched."""
    packing = config.packing
    return SFTConfig(
        **trainer_arguments(config, output_dir, plan, evaluate=evaluate, checkpointing=checkpointing),
        # The data is truncated already: SFTConfig's 1024 would cut more. The packing length; TRL refuses one
        # for padding-free batches of examples, which it would not truncate.
        max_length=None if config.padding_free and not packing else config.max_seq_length,
        # Best-fit-decreasing packing of whole examples into rows of max_length: TRL builds the labels before
        # it packs, and packed batches are padding-free.
        packing=packing,
        packing_strategy="bfd",
        # Padding-free, TRL's collator concatenates a batch into one row, and passes position_ids restarting
        # at 0 for each example and its boundaries, no attention_mask: transformers then masks each example
        # to itself, and worker.packed_attention attends per example.
        padding_free=config.padding_free,
        # Validation batches stay batches of examples: eval_loss means the same, packed or not.
        eval_packing=False,
        train_sampling_strategy="group_by_length" if config.group_by_length and not packing else "random",
        # The dataset is already tokenised; TRL applies its completion_mask column only when this is True.
        completion_only_loss=True,
    )


def trainer_arguments(
    config: TrainingConfig,
    output_dir: Path,
    plan: HardwarePlan,
    *,
    evaluate: bool,
    checkpointing: bool | None = None,
) -> dict[str, Any]:
    """The `TrainingArguments` of a job, whatever its trainer; precision follows the hardware unless set,
    gradient checkpointing `checkpointing` (the recipe's decision, see
    `memory_estimate.decide_checkpointing`), else as set."""
    if checkpointing is None:
        checkpointing = bool(config.gradient_checkpointing)
    return dict(
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
        # TRL's configs default both to on, which makes CPU training many times slower. Transformers 5 renamed
        # gradient checkpointing to activation checkpointing; the new name wins over TRL's default.
        bf16=plan.mixed_precision == "bf16",
        fp16=plan.mixed_precision == "fp16",
        use_cpu=plan.device.type == "cpu",
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs=config.gradient_checkpointing_kwargs,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(config.eval_steps or config.logging_steps) if evaluate else None,
        # EarlyStoppingCallback compares each eval_loss with the trainer's best_metric, which the trainer
        # keeps once a metric is named. The trainer loads no best model itself (its load_best_model_at_end
        # needs its own checkpoints): CheckpointCallback keeps the best adapter, which the recipe ships.
        metric_for_best_model="eval_loss" if config.early_stopping_patience else None,
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",  # feeds trained_tokens and tokens_per_second
        report_to="none",  # worker.trackers adds the job's trackers, set up from the worker's settings
        disable_tqdm=True,  # progress goes to the reporter, not to the worker's log
        dataloader_pin_memory=plan.device.type == "cuda",
        log_level=config.log_level or "passive",
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: RecipeInputs,
    plan: HardwarePlan,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    callbacks: list[TrainerCallback],
    *,
    checkpointing: bool | None = None,
) -> SFTTrainer:
    """An SFTTrainer that trains `model`'s LoRA weights on the tokenised datasets; with backend peft it first
    wraps `model` in a fresh PEFT adapter."""
    args = build_trainer_args(
        inputs.training_config,
        inputs.output_dir / "trainer",
        plan,
        evaluate=eval_dataset is not None,
        checkpointing=checkpointing,
    )
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_lora_config(inputs.peft_config) if inputs.peft_config.backend == "peft" else None,
        callbacks=callbacks,
    )
    # The model SFTTrainer gave its fused LM head; on the CPU, a head that scores trained positions only.
    headed = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    if plan.device.type == "cpu" and isinstance(headed, PreTrainedModel) and lm_head.applies_to(headed):
        lm_head.score_labelled_positions_only(headed)
    return trainer


class RecipeTrainer(SFTTrainer):
    """SFTTrainer whose saved states hold only the trained weights. A loralib model is a plain
    PreTrainedModel, whose save would write every base weight into each resume state; the trainer's resume
    loads a model's weights with strict=False, so the LoRA weights alone restore it.

    It also counts the tokens of padding-free batches and keeps validation batches in the file's order."""

    def _track_num_input_tokens(self, inputs: dict) -> None:
        # A padding-free batch has no attention_mask, and the trainer would count its tokens that differ from
        # the pad token: Phi-3's pad token is the end-of-text token that ends every example. TRL's batch is
        # then one row of real tokens only (it pads to no multiple here).
        if "attention_mask" in inputs or "position_ids" not in inputs:
            super()._track_num_input_tokens(inputs)
            return
        tokens = torch.tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()  # every rank's

    def _get_eval_sampler(self, eval_dataset: Dataset) -> SequentialSampler:
        # The trainer groups validation batches by length too under group_by_length; in the file's order,
        # eval_loss (a mean of the batches' means) means the same whatever training batches.
        return SequentialSampler(eval_dataset)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if output_dir is None or isinstance(self.model, PeftModel):
            super().save_model(output_dir, _internal_call)
            return
        if not self.args.should_save:  # rank 0 of a multi-process job saves
            return
        os.makedirs(output_dir, exist_ok=True)
        trained = {
            name: parameter.detach().cpu().contiguous()
            for name, parameter in trained_model(self).named_parameters()
            if parameter.requires_grad
        }
        save_file(trained, os.path.join(output_dir, "model.safetensors"))


class ReporterCallback(TrainerCallback):
    """Turns the trainer's logs into `reporter.on_metrics` events and stops training once cancelled.

    One event per logged step; when that step is also evaluated the event waits for, and carries, eval_loss
    and eval_mean_token_accuracy.
    """

    def __init__(self, reporter: ProgressReporter, metrics: Mapping[str, str] | None = None) -> None:
        self.reporter = reporter
        self.metrics = metrics or {}  # the method's own log keys → event names (TrainingMethod.metrics)
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
            "train_mean_token_accuracy": logs.get("mean_token_accuracy"),
            "learning_rate": logs["learning_rate"],
            "tokens_per_second": (tokens - self._last_tokens) / max(now - self._last_time, 1e-9),
            **{f"train_{name}": logs.get(key) for key, name in self.metrics.items()},
        }
        self._last_time, self._last_tokens = now, tokens
        if control.should_evaluate:
            self._pending = event
        else:
            self._report(event, control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        event, self._pending = self._pending, None
        assert event is not None  # the trainer logs a step before it evaluates it (see on_step_end)
        metrics = {
            "eval_loss": metrics["eval_loss"],
            "eval_mean_token_accuracy": metrics["eval_mean_token_accuracy"],
            **{f"eval_{name}": metrics.get(f"eval_{key}") for key, name in self.metrics.items()},
        }
        self._report({**event, **metrics}, control)

    def _report(self, event: dict, control) -> None:
        """Send a metrics event; the reply may carry a cancellation, which stops training after this step."""
        self.reporter.on_metrics(event)
        if self.reporter.should_stop():
            self.cancelled = True
            control.should_training_stop = True


def trained_model(trainer: Trainer) -> nn.Module:
    """The trainer's model: Trainer types it as optional, for trainers made with `model_init` instead."""
    if trainer.model is None:
        raise RuntimeError("the trainer has no model")
    return trainer.model


def last_train_loss(trainer: Trainer) -> float | None:
    """The train loss of the last logging step, None if no step was logged."""
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses[-1] if losses else None


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint: its adapter directory, the metrics reported with it and the formats it holds."""

    step: int
    directory: Path
    metrics: dict
    formats: list[str]


class CheckpointCallback(TrainerCallback):
    """Every `interval` steps, saves the adapter (evaluated first when there is a validation set) and hands it
    to `reporter.on_checkpoint`; records every eval loss. With `keep_best` the directory of the checkpoint
    with the lowest eval loss so far stays on disk, for the recipe to ship; the others are deleted."""

    def __init__(
        self,
        reporter: ProgressReporter,
        *,
        save: Callable[[nn.Module, Path, dict], list[str]],
        directory: Path,
        interval: int | None,
        evaluate: bool,
        keep_best: bool,
    ) -> None:
        self.reporter = reporter
        self.save = save
        self.directory = directory
        self.interval = interval
        self.evaluate = evaluate
        self.keep_best = keep_best
        self.best: Checkpoint | None = None
        self.eval_losses: dict[int, float] = {}
        self._due: dict | None = None  # the metrics of the checkpoint this step makes

    def restore(self, manifest: resume_state.Manifest, state_dir: Path) -> None:
        """Continue from a resume state: the eval losses so far and the best checkpoint's adapter."""
        self.eval_losses = {int(step): loss for step, loss in manifest.eval_losses.items()}
        if manifest.best is not None:
            best = manifest.best
            directory = self.directory / f"checkpoint-{best['step']}"
            shutil.copytree(state_dir / resume_state.BEST_DIR, directory)
            self.best = Checkpoint(best["step"], directory, best["metrics"], best["formats"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.interval is not None and state.global_step % self.interval == 0:
            self._due = {
                "step": state.global_step,
                "train_loss": None,
                "train_mean_token_accuracy": None,
                "valid_loss": None,
                "valid_mean_token_accuracy": None,
            }
            # The checkpoint carries this step's train loss and, when there is a validation set, eval loss.
            control.should_log = True
            control.should_evaluate = control.should_evaluate or self.evaluate

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._due is None or "loss" not in logs:
            return
        self._due["train_loss"] = logs["loss"]
        self._due["train_mean_token_accuracy"] = logs.get("mean_token_accuracy")
        if not control.should_evaluate:
            self._store(model, state)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self.eval_losses[state.global_step] = metrics["eval_loss"]
        if self._due is not None:
            self._due["valid_loss"] = metrics["eval_loss"]
            self._due["valid_mean_token_accuracy"] = metrics["eval_mean_token_accuracy"]
            self._store(model, state)

    def _store(self, model: nn.Module, state) -> None:
        metrics, self._due = self._due, None
        assert metrics is not None  # called only while a checkpoint is due
        if not state.is_world_process_zero:  # the ranks of a multi-process job hold the same weights
            return
        directory = self.directory / f"checkpoint-{metrics['step']}"
        checkpoint = Checkpoint(metrics["step"], directory, metrics, self.save(model, directory, metrics))
        self.reporter.on_checkpoint(checkpoint.step, directory, metrics)
        loss = metrics["valid_loss"]
        if (
            self.keep_best
            and loss is not None
            and (self.best is None or loss < self.best.metrics["valid_loss"])
        ):
            if self.best is not None:
                shutil.rmtree(self.best.directory)
            self.best = checkpoint
        else:
            shutil.rmtree(directory)


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping on eval_loss, which also records the step it stopped at. The adapter
    shipped is the best checkpoint's (`CheckpointCallback`, load_best_model_at_end being implied)."""

    def __init__(self, checkpoints: CheckpointCallback, patience: int, threshold: float) -> None:
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.checkpoints = checkpoints
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # Not EarlyStoppingCallback's, which warns that the trainer loads no best model: the recipe ships it.
        # A resumed attempt counts the evaluations without improvement from the eval losses it restored, as
        # the interrupted one had counted them.
        self.early_stopping_patience_counter = 0
        best = SimpleNamespace(best_metric=None)  # the trainer's state as it was at each evaluation
        for step in sorted(self.checkpoints.eval_losses):
            loss = self.checkpoints.eval_losses[step]
            self.check_metric_value(args, best, control, loss)
            best.best_metric = loss if best.best_metric is None else min(best.best_metric, loss)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        stopping = self.early_stopping_patience_counter >= self.early_stopping_patience
        if stopping and state.global_step < state.max_steps:  # at the last step training ends anyway
            self.stopped_at = state.global_step

    def describe(self) -> tuple[str, dict] | None:
        """The event that says where training stopped, why, and which evaluation was the best; None when it
        did not stop early."""
        if self.stopped_at is None:
            return None
        losses = self.checkpoints.eval_losses
        best_step = min(losses, key=lambda step: (losses[step], step))
        text = (
            f"Early stopping at step {self.stopped_at}: eval_loss did not improve by more than "
            f"{self.early_stopping_threshold:g} for {self.early_stopping_patience} evaluations "
            f"(best {losses[best_step]:.4f} at step {best_step})"
        )
        figures = {
            "step": self.stopped_at,
            "best_step": best_step,
            "best_eval_loss": losses[best_step],
            "early_stopping_patience": self.early_stopping_patience,
            "early_stopping_threshold": self.early_stopping_threshold,
        }
        return text, figures


class ResumeStateCallback(TrainerCallback):
    """Hands the reporter a resume state every `interval` steps, at least every `seconds`, and when the
    attempt is handed back (paused or preempted), after which training stops.

    The trainer writes its own checkpoint (asked for with `control.should_save`); this callback adds the
    manifest and the best checkpoint so far. The same step is logged, so that a run resumed from it averages
    its train loss over the same steps as the uninterrupted run.
    """

    def __init__(
        self,
        reporter: ProgressReporter,
        checkpoints: CheckpointCallback,
        *,
        fingerprint: str,
        interval: int | None,
        seconds: float | None,
    ) -> None:
        self.reporter = reporter
        self.checkpoints = checkpoints
        self.fingerprint = fingerprint
        self.interval = interval
        self.seconds = seconds
        self.handed_back: str | None = None
        self._last_saved = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_saved = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            return  # the final adapter is being saved; a state of the last step resumes nothing
        self.handed_back = self.reporter.hand_back()
        due = (
            self.handed_back is not None
            or (self.interval is not None and state.global_step % self.interval == 0)
            or (self.seconds is not None and time.monotonic() - self._last_saved >= self.seconds)
        )
        if rank_zero_decides(due):  # every rank saves its part of a state, or none does
            control.should_save = True
            control.should_log = True
        if self.handed_back is not None:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        all_ranks_here()  # each rank has written its RNG state into the trainer's checkpoint
        if not state.is_world_process_zero:  # rank 0's clock decides when the next state is due
            return
        state_dir = Path(args.output_dir) / f"state-{state.global_step}"
        state_dir.mkdir()
        # The trainer's checkpoint goes in a folder of its own: a sub-folder holding an adapter (best/) inside
        # it would be loaded by the trainer's resume as a second adapter.
        os.rename(
            Path(args.output_dir) / f"checkpoint-{state.global_step}", state_dir / resume_state.TRAINER_DIR
        )
        best = self.checkpoints.best
        if best is not None:
            shutil.copytree(best.directory, state_dir / resume_state.BEST_DIR)
        manifest = resume_state.Manifest(
            step=state.global_step,
            fingerprint=self.fingerprint,
            best={"step": best.step, "metrics": best.metrics, "formats": best.formats} if best else None,
            eval_losses={str(step): loss for step, loss in self.checkpoints.eval_losses.items()},
        )
        resume_state.write_manifest(state_dir, manifest)
        self.reporter.on_resume_state(state.global_step, state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        self._last_saved = time.monotonic()


def save_adapter(
    model: nn.Module, adapter_dir: Path, inputs: RecipeInputs, *, step: int, train_loss: float | None
) -> list[str]:
    """Save the adapter of `model` (a PeftModel, or a model with loralib layers) as safetensors with a model
    card; the base model's weights are not copied. Returns the formats saved: "peft" and/or "loralib"."""
    if inputs.peft_config.backend == "loralib":
        config = LoralibConfig.from_peft_config(inputs.peft_config)
        formats = loralib_backend.save_adapter(model, adapter_dir, config, inputs.base_model)
    else:
        assert isinstance(model, PeftModel)  # the trainer wraps the model of backend peft in one
        # Only the trained adapter: a DPO job continuing from another holds it as its reference ("ref").
        model.save_pretrained(str(adapter_dir), safe_serialization=True, selected_adapters=["default"])
        formats = ["peft"]
    (adapter_dir / "README.md").write_text(model_card(inputs, step, train_loss, formats), encoding="utf-8")
    return formats


def model_card(inputs: RecipeInputs, step: int, train_loss: float | None, formats: list[str]) -> str:
    """A short README.md: what the adapter applies to, how it was trained and where its files are."""
    loss = "not logged" if train_loss is None else f"{train_loss:.4f}"
    settings = inputs.training_config.model_dump(exclude_none=True)
    if inputs.dpo is not None:
        settings["dpo"] = inputs.dpo.model_dump()
    training = json.dumps(settings, indent=2)
    lora = json.dumps(inputs.peft_config.model_dump(exclude_none=True), indent=2)
    library = "library_name: peft\n" if "peft" in formats else ""
    files = []
    if "peft" in formats:
        files.append("PEFT: `PeftModel.from_pretrained(base_model, <this directory>)`.")
    else:
        files.append(f"PEFT: not available, see {PEFT_UNAVAILABLE_FILE}.")
    if "loralib" in formats:
        files.append(f"loralib: `{LORALIB_DIR}/`, see its README.md.")
    return (
        f"---\nbase_model: {inputs.base_model}\n{library}tags: [lora, phitune]\n---\n\n"
        f"# LoRA adapter for {inputs.base_model}\n\n"
        f"Fine-tuned by phitune with TRL's {'DPOTrainer' if inputs.dpo else 'SFTTrainer'}.\n\n"
        f"Step: {step}. Train loss at the last logged step: {loss}\n\n"
        "## Formats\n\n" + "".join(f"- {line}\n" for line in files) + "\n"
        f"## Training config\n\n```json\n{training}\n```\n\n"
        f"## LoRA config\n\n```json\n{lora}\n```\n"
    )
