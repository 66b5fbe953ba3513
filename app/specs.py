"""The two dictionaries of the Phi-3 LoRA recipe, as closed schemas shared by the API and the worker.

`TrainingConfig` and `PeftConfig` are the only definition of a job's training settings: the API
validates requests with them and the worker builds its trainer and LoRA config from them. Unknown keys
are refused (`extra="forbid"`) so a typo never silently trains with a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4

PositiveInt = Annotated[int, Field(gt=0)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingConfig(_Closed):
    """Trainer settings. Field names follow `transformers.TrainingArguments` / `trl.SFTConfig`."""

    learning_rate: float = Field(DEFAULT_LEARNING_RATE, gt=0, le=1, description="Peak learning rate.")
    num_train_epochs: float = Field(DEFAULT_EPOCHS, gt=0, le=100, description="Passes over the data.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: PositiveInt = Field(DEFAULT_BATCH_SIZE, le=1024)
    per_device_eval_batch_size: PositiveInt = Field(DEFAULT_BATCH_SIZE, le=1024)
    gradient_accumulation_steps: PositiveInt = Field(1, le=1024)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(2048, ge=16, le=131072, description="Longer examples are truncated.")
    logging_steps: PositiveInt = Field(10, description="A metrics event every N optimizer steps.")
    eval_steps: PositiveInt | None = Field(
        None, description="Evaluate on validation_file every N steps (default: logging_steps)."
    )
    save_steps: PositiveInt | None = Field(None, description="Store a checkpoint every N steps.")
    save_total_limit: PositiveInt | None = Field(None, description="Keep at most N checkpoints.")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    bf16: bool | None = Field(None, description="None: bf16 where the GPU supports it, fp32 elsewhere.")
    gradient_checkpointing: bool | None = Field(None, description="None: on for GPUs, off on CPU.")
    train_on_inputs: bool = Field(False, description="Also train on system/user tokens, not only replies.")
    # Accepted so the recipe's dictionary can be pasted as is; the server owns output and logging.
    output_dir: str | None = Field(None, description="Ignored: the server stores every artifact.")
    overwrite_output_dir: bool | None = Field(None, description="Ignored.")
    logging_strategy: Literal["steps"] = "steps"
    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] | None = None
    do_eval: bool | None = Field(None, description="Ignored: evaluation runs when validation_file is set.")
    remove_unused_columns: bool | None = Field(None, description="Ignored.")
    gradient_checkpointing_kwargs: dict[str, bool] | None = Field(
        None, description="Only {'use_reentrant': bool} is meaningful."
    )

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingConfig:
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use num_train_epochs) or a positive number")
        return self


class PeftConfig(_Closed):
    """LoRA settings. Field names follow `peft.LoraConfig`."""

    r: PositiveInt = Field(16, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False


class Hyperparameters(BaseModel):
    """OpenAI's shorthand; mapped onto TrainingConfig. "auto" means the TrainingConfig default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[int, Field(gt=0, le=100)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(gt=0, le=1024)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"

    def as_training_config(self) -> dict[str, float | int]:
        """The TrainingConfig fields these shorthand values set."""
        mapped: dict[str, float | int] = {}
        if self.n_epochs != "auto":
            mapped["num_train_epochs"] = self.n_epochs
        if self.batch_size != "auto":
            mapped["per_device_train_batch_size"] = self.batch_size
        if self.learning_rate_multiplier != "auto":
            mapped["learning_rate"] = DEFAULT_LEARNING_RATE * self.learning_rate_multiplier
        return mapped


HYPERPARAMETER_FIELDS = {
    "num_train_epochs": "n_epochs",
    "per_device_train_batch_size": "batch_size",
    "learning_rate": "learning_rate_multiplier",
}
