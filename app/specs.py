"""The two dictionaries of the Phi-3 LoRA recipe, as closed schemas shared by the API and the worker.

`TrainingConfig` and `PeftConfig` are the only definition of a job's training settings: the API
validates requests with them and the worker builds its trainer and LoRA config from them. Unknown keys
are refused (`extra="forbid"`) so a typo never silently trains with a default. Every number is finite and
bounded, every string and list capped, by the constants of `app.limits`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.limits import (
    MAX_BATCH_SIZE,
    MAX_EARLY_STOPPING_THRESHOLD,
    MAX_EPOCHS,
    MAX_GRAD_NORM,
    MAX_GRADIENT_ACCUMULATION_STEPS,
    MAX_LEARNING_RATE,
    MAX_LEARNING_RATE_MULTIPLIER,
    MAX_LORA_ALPHA,
    MAX_LORA_RANK,
    MAX_SAVE_TOTAL_LIMIT,
    MAX_SEED,
    MAX_SEQ_LENGTH,
    MAX_STEPS,
    MAX_TARGET_MODULES,
    MAX_WEIGHT_DECAY,
    MIN_SEQ_LENGTH,
    ModelId,
    ModuleName,
    OutputDir,
)

DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
MAX_NUM_PROCESSES = 64  # data-parallel processes of one job on one worker (torchrun's nproc-per-node)

PositiveInt = Annotated[int, Field(gt=0)]
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)]

Tracker = Literal["mlflow", "tensorboard", "wandb"]
TRACKERS: tuple[str, ...] = get_args(Tracker)
"""The experiment trackers a job may name in report_to; where each sends its data is the server's setting."""


def _tracker_list(value: Any) -> Any:
    # The recipe writes one name or "none"; TrainingArguments takes a list too. Stored as a list.
    if value is None or value == "none" or value == ["none"]:
        return []
    return [value] if isinstance(value, str) else value


ReportTo = Annotated[
    list[Tracker],
    Field(max_length=len(TRACKERS)),
    BeforeValidator(_tracker_list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": ["none", *TRACKERS]},
                {
                    "type": "array",
                    "items": {"type": "string", "enum": list(TRACKERS)},
                    "maxItems": len(TRACKERS),
                },
                {"type": "null"},
            ]
        },
        mode="validation",
    ),
]


class _Closed(BaseModel):
    # Finite numbers only: JSON's 1e999 parses as infinity, which no trainer can use nor response carry.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainingConfig(_Closed):
    """Trainer settings. Field names follow `transformers.TrainingArguments` / `trl.SFTConfig`."""

    learning_rate: float = Field(
        DEFAULT_LEARNING_RATE, gt=0, le=MAX_LEARNING_RATE, description="Peak learning rate."
    )
    num_train_epochs: float = Field(DEFAULT_EPOCHS, gt=0, le=MAX_EPOCHS, description="Passes over the data.")
    max_steps: int = Field(
        -1, ge=-1, le=MAX_STEPS, description="Stop after this many optimizer steps (-1: use epochs)."
    )
    per_device_train_batch_size: BatchSize = DEFAULT_BATCH_SIZE
    per_device_eval_batch_size: BatchSize = DEFAULT_BATCH_SIZE
    gradient_accumulation_steps: PositiveInt = Field(1, le=MAX_GRADIENT_ACCUMULATION_STEPS)
    num_processes: PositiveInt = Field(
        1,
        le=MAX_NUM_PROCESSES,
        description="Train on this many devices of one worker with data parallelism (DDP through "
        "torchrun): a step trains per_device_train_batch_size × gradient_accumulation_steps × num_processes "
        "examples. A worker that owns fewer devices (PHITUNE_WORKER_DEVICES) fails the job.",
    )
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY)
    max_grad_norm: float = Field(1.0, gt=0, le=MAX_GRAD_NORM)
    max_seq_length: int = Field(
        2048, ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH, description="Longer examples are truncated."
    )
    logging_steps: Steps = Field(10, description="A metrics event every N optimizer steps.")
    eval_steps: Steps | None = Field(
        None, description="Evaluate on validation_file every N steps (default: logging_steps)."
    )
    save_steps: Steps | None = Field(
        None,
        description="Store a checkpoint every N steps, evaluated on validation_file when there is one "
        "(default: none, or every eval_steps with load_best_model_at_end).",
    )
    save_total_limit: int = Field(
        MAX_SAVE_TOTAL_LIMIT,
        ge=1,
        le=MAX_SAVE_TOTAL_LIMIT,
        description="Keep at most N checkpoints, the oldest pruned first (null: the default).",
    )
    seed: int = Field(42, ge=0, le=MAX_SEED)
    bf16: bool | None = Field(None, description="None: bf16 where the GPU supports it, fp32 elsewhere.")
    gradient_checkpointing: bool | None = Field(
        None,
        description="None: off on CPU; on a GPU, off when the estimated memory of training without it fits "
        "in the GPU's free memory, else on.",
    )
    padding_free: bool = Field(
        True,
        description="Concatenate each batch's examples into one row without padding, each attending only "
        "to itself: the same batches, steps and loss as padded ones, without computing the padding (LoRA "
        "dropout draws its masks differently).",
    )
    packing: bool = Field(
        False,
        description="Pack the training examples into rows of max_seq_length tokens (best-fit decreasing), "
        "padding-free: a step then trains per_device_train_batch_size rows of many examples, so an epoch "
        "has fewer steps (raise the learning rate or the epochs to match). Validation batches stay unpacked.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing: batch training examples of similar length (less padding).",
    )
    train_on_inputs: bool = Field(False, description="Also train on system/user tokens, not only replies.")
    load_best_model_at_end: bool = Field(
        False,
        description="Ship the checkpoint (or final step) with the lowest eval loss; needs validation_file.",
    )
    early_stopping_patience: Steps | None = Field(
        None,
        description="Stop once eval_loss has not improved by more than early_stopping_threshold for this "
        "many evaluations in a row; needs validation_file, and implies load_best_model_at_end (the best "
        "step ships).",
    )
    early_stopping_threshold: float = Field(
        0.0,
        ge=0,
        le=MAX_EARLY_STOPPING_THRESHOLD,
        description="How much eval_loss must fall below its best so far to count as improving.",
    )
    report_to: ReportTo = Field(
        default_factory=list,
        description='Experiment trackers the worker also logs this job to: "mlflow", "tensorboard", "wandb" '
        'or a list of them; "none" (the default): none. Only names a tracker: where it sends data is the '
        "server's setting, and a tracker the server does not offer is refused.",
    )
    init_from: ModelId | None = Field(
        None,
        description="A fine-tuned model id (ft:…) or a checkpoint's (ft:…:ckpt-step-N) of this tenant and "
        "this base model: training starts from its LoRA weights (with a new optimizer and schedule), and the "
        "job takes its LoRA settings.",
    )
    # Accepted so the recipe's dictionary can be pasted as is; the server owns output and logging.
    output_dir: OutputDir | None = Field(
        None, description="Ignored and not stored (always null): the server stores every artifact."
    )
    overwrite_output_dir: bool | None = Field(None, description="Ignored.")
    logging_strategy: Literal["steps"] = "steps"
    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] | None = None
    do_eval: bool | None = Field(None, description="Ignored: evaluation runs when validation_file is set.")
    remove_unused_columns: bool | None = Field(None, description="Ignored.")
    gradient_checkpointing_kwargs: Annotated[dict[str, bool], Field(max_length=1)] | None = Field(
        None, description="{'use_reentrant': bool}, or nothing."
    )

    @field_validator("save_total_limit", mode="before")
    @classmethod
    def _default_limit(cls, limit: Any) -> Any:
        # The recipe's dictionaries write null for "keep all": keep the most allowed, so a job that saves a
        # checkpoint every step never keeps an unbounded number.
        return MAX_SAVE_TOTAL_LIMIT if limit is None else limit

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, trackers: list[str]) -> list[str]:
        return sorted(set(trackers))

    @field_validator("gradient_checkpointing_kwargs")
    @classmethod
    def _only_use_reentrant(cls, kwargs: dict[str, bool] | None) -> dict[str, bool] | None:
        if kwargs and set(kwargs) != {"use_reentrant"}:
            raise ValueError(f"only 'use_reentrant' is accepted, not {', '.join(map(repr, kwargs))}")
        return kwargs

    @field_validator("output_dir")
    @classmethod
    def _not_stored(cls, _: str | None) -> None:
        # Accepted (bounded) so the recipe can be pasted, but never stored or echoed in every job object.
        return None

    @model_validator(mode="before")
    @classmethod
    def _early_stopping_ships_the_best(cls, data: Any) -> Any:
        # Early stopping trains `patience` evaluations past the best step, which is then the one to ship:
        # load_best_model_at_end is implied, and shown set in the job's training_config.
        if isinstance(data, dict) and data.get("early_stopping_patience") is not None:
            return {"load_best_model_at_end": True, **data}
        return data

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingConfig:
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use num_train_epochs) or a positive number")
        return self

    @model_validator(mode="after")
    def _check_early_stopping(self) -> TrainingConfig:
        if self.early_stopping_patience is None:
            if self.early_stopping_threshold:
                raise ValueError("early_stopping_threshold applies only with early_stopping_patience")
        elif not self.load_best_model_at_end:
            raise ValueError(
                "early_stopping_patience ships the best step, as load_best_model_at_end does; leave "
                "load_best_model_at_end unset or true"
            )
        elif self.save_steps is not None and self.save_steps != self.evaluation_interval():
            # The best step ships only if it was kept: checkpoints at every evaluation, no other.
            raise ValueError(
                "with early_stopping_patience a checkpoint is kept at every evaluation, so that the best one "
                "ships: leave save_steps unset or equal to eval_steps (default logging_steps)"
            )
        return self

    def evaluation_interval(self) -> int:
        """Steps between evaluations on the validation file."""
        return self.eval_steps or self.logging_steps

    def checkpoint_interval(self) -> int | None:
        """Steps between checkpoints: save_steps, else every evaluation when the best one is shipped."""
        if self.save_steps is None and self.load_best_model_at_end:
            return self.evaluation_interval()
        return self.save_steps


QkvSlice = Literal["q", "k", "v"]

LORALIB_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The Phi-3 projections the loralib backend adapts; its "all-linear" means all four."""

# Embedding and output layers, under the names of the common architectures: the inference server applies
# LoRA to the linear projections of the layers only, so an adapter of these could be trained but not served.
UNADAPTABLE_MODULES = {
    "lm_head", "embed_tokens", "wte", "wpe", "embed_out", "embed_in", "word_embeddings", "tok_embeddings",
    "score",
}  # fmt: skip

RECIPE_FIELDS = frozenset({"backend", "qkv_slices", "quantization"})
"""PeftConfig fields that choose how phitune trains; the others are `peft.LoraConfig`'s."""

CONTINUATION_FIELDS = frozenset({"lora_dropout", "quantization"})
"""PeftConfig fields a job continuing from an adapter (`init_from`) may choose for itself; the others shape
the adapter, and it inherits them."""


class PeftConfig(_Closed):
    """LoRA settings. Field names follow `peft.LoraConfig`, except the RECIPE_FIELDS."""

    backend: Literal["peft", "loralib"] = Field(
        "peft",
        description="peft: PEFT's LoRA layers. loralib: Microsoft's loralib layers, with one LoRA per "
        "slice of Phi-3's fused qkv_proj (lora.MergedLinear).",
    )
    qkv_slices: Annotated[list[QkvSlice], Field(min_length=1, max_length=3)] | None = Field(
        None,
        description="loralib only: the slices of the fused qkv_proj that get a LoRA (default all three; "
        'the LoRA paper adapts ["q", "v"]).',
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None,
        description="QLoRA: train over a base quantised by bitsandbytes (4bit: NF4, double quantisation, "
        "bf16 compute, fp16 on GPUs without bf16). The adapter serves over the unquantised base.",
    )
    r: PositiveInt = Field(16, le=MAX_LORA_RANK, description="LoRA rank.")
    lora_alpha: float = Field(
        32, gt=0, le=MAX_LORA_ALPHA, description="Scaling numerator: the update is scaled by alpha / r."
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    target_modules: (
        Literal["all-linear"]
        | Annotated[list[ModuleName], Field(min_length=1, max_length=MAX_TARGET_MODULES)]
    ) = "all-linear"
    modules_to_save: Annotated[list[ModuleName], Field(max_length=MAX_TARGET_MODULES)] | None = None
    use_rslora: bool = False

    @field_validator("qkv_slices")
    @classmethod
    def _slices_in_qkv_order(cls, slices: list[str] | None) -> list[str] | None:
        if slices is not None and len(set(slices)) != len(slices):
            raise ValueError(f"qkv_slices lists a slice twice: {slices}")
        return None if slices is None else sorted(slices, key="qkv".index)

    @field_validator("target_modules")
    @classmethod
    def _only_adaptable_modules(cls, targets: str | list[str]) -> str | list[str]:
        names = targets if isinstance(targets, list) else []
        if refused := [name for name in names if name.rsplit(".", 1)[-1] in UNADAPTABLE_MODULES]:
            raise ValueError(
                f"{', '.join(refused)}: embedding and output layers take no LoRA here (the inference server "
                "applies LoRA to the layers' linear projections only); adapt attention and MLP projections"
            )
        return targets

    @field_validator("modules_to_save")
    @classmethod
    def _nothing_trained_in_full(cls, modules: list[str] | None) -> list[str] | None:
        if modules:
            raise ValueError(
                "modules trained in full cannot be served: the inference server applies LoRA deltas only; "
                "leave modules_to_save unset"
            )
        return modules

    @model_validator(mode="after")
    def _check_backend(self) -> PeftConfig:
        if self.backend == "peft":
            if self.qkv_slices is not None:
                raise ValueError(
                    "peft_config.qkv_slices needs backend 'loralib': PEFT adapts a fused qkv_proj as one "
                    "layer"
                )
            return self
        unsupported = {
            "quantization": "loralib trains over an unquantised base; use backend 'peft' for QLoRA",
            "use_rslora": "loralib scales by lora_alpha / r",
        }
        for name, reason in unsupported.items():
            if getattr(self, name):
                raise ValueError(f"peft_config.{name} is not supported with backend 'loralib': {reason}")
        unknown = [name for name in self.loralib_targets() if name not in LORALIB_TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"peft_config.target_modules: backend 'loralib' adapts {', '.join(LORALIB_TARGET_MODULES)}; "
                f"not {', '.join(unknown)}"
            )
        if self.qkv_slices is not None and "qkv_proj" not in self.loralib_targets():
            raise ValueError("peft_config.qkv_slices is set but target_modules leaves out qkv_proj")
        return self

    def loralib_targets(self) -> list[str]:
        """The module names the loralib backend adapts, "all-linear" spelled out."""
        if self.target_modules == "all-linear":
            return list(LORALIB_TARGET_MODULES)
        return list(self.target_modules)

    def enabled_qkv_slices(self) -> list[str]:
        """The slices of qkv_proj that get a LoRA under the loralib backend (all three by default)."""
        return list(self.qkv_slices or ("q", "k", "v"))


# The layers LoRA can adapt, for the model types whose layer names are known without loading the model.
_ADAPTABLE_MODULES = {"phi3": set(LORALIB_TARGET_MODULES)}


def check_against_model(peft_config: PeftConfig, model_config: dict[str, Any]) -> None:
    """Raise ValueError, naming the field, when `peft_config` cannot train the model of `model_config`
    (the base model's config.json): unknown target modules, or loralib on a qkv_proj it cannot split."""
    model_type = model_config.get("model_type")
    known = _ADAPTABLE_MODULES.get(model_type) if isinstance(model_type, str) else None
    if peft_config.backend == "loralib" and model_type != "phi3":
        raise ValueError(
            f"peft_config.backend: 'loralib' adapts Phi-3's fused projections (model_type 'phi3'); "
            f"this base model is '{model_type}'"
        )
    if known is not None and peft_config.target_modules != "all-linear":
        # PEFT also matches dotted suffixes such as "self_attn.qkv_proj"; the last part names the layer.
        missing = [name for name in peft_config.target_modules if name.rsplit(".", 1)[-1] not in known]
        if missing:
            raise ValueError(
                f"peft_config.target_modules: {model_type} models have no {', '.join(missing)}; "
                f"LoRA can adapt {', '.join(sorted(known))}"
            )
    if peft_config.bias != "none" and (model_config.get("attention_bias") or model_config.get("mlp_bias")):
        raise ValueError(
            f"peft_config.bias: '{peft_config.bias}' trains this model's linear biases, which the inference "
            "server cannot apply (it serves LoRA weights only); use 'none'"
        )
    if peft_config.backend == "loralib" and "qkv_proj" in peft_config.loralib_targets():
        query_heads = model_config["num_attention_heads"]
        kv_heads = model_config.get("num_key_value_heads") or query_heads
        if kv_heads != query_heads:
            raise ValueError(
                "peft_config.qkv_slices: lora.MergedLinear splits qkv_proj into three equal slices, but "
                f"this model's q slice is {query_heads} heads wide and its k and v slices {kv_heads} "
                "(grouped-query attention); leave qkv_proj out of target_modules or use backend 'peft'"
            )


def fit_to_model(
    training_config: TrainingConfig, peft_config: PeftConfig, model_config: dict[str, Any]
) -> TrainingConfig:
    """`training_config` checked against the base model's config.json, its max_seq_length capped at the
    model's context when the job left it at the default; ValueError, naming the field, when the job cannot
    train this model (see also `check_against_model`). The API calls it at creation, the worker again."""
    check_against_model(peft_config, model_config)
    context = model_config.get("max_position_embeddings")
    if not isinstance(context, int) or training_config.max_seq_length <= context:
        return training_config
    if "max_seq_length" in training_config.model_fields_set:
        raise ValueError(
            f"training_config.max_seq_length: {training_config.max_seq_length} is longer than the base "
            f"model's context of {context} tokens"
        )
    return training_config.model_copy(update={"max_seq_length": context})


class Hyperparameters(BaseModel):
    """OpenAI's shorthand; mapped onto TrainingConfig. "auto" means the TrainingConfig default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_epochs: Literal["auto"] | Annotated[int, Field(gt=0, le=MAX_EPOCHS)] = "auto"
    batch_size: Literal["auto"] | BatchSize = "auto"
    learning_rate_multiplier: (
        Literal["auto"] | Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE_MULTIPLIER)]
    ) = "auto"

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


DEFAULT_DPO_BETA = 0.1
MAX_DPO_BETA = 10.0  # the reward scale; beyond it the loss saturates after a step
MAX_LABEL_SMOOTHING = 0.5  # the share of pairs assumed mislabelled: at 0.5 the robust loss divides by 0

Beta = Annotated[float, Field(gt=0, le=MAX_DPO_BETA)]
DpoLossType = Literal["sigmoid", "robust", "ipo", "hinge"]
LabelSmoothing = Annotated[float, Field(ge=0, lt=MAX_LABEL_SMOOTHING)]


class DpoConfig(_Closed):
    """The preference (DPO) settings of a job, under `trl.DPOConfig`'s names: the API stores them resolved as
    the job's method and the worker trains with them. A job without them is supervised."""

    beta: Beta = Field(
        DEFAULT_DPO_BETA,
        description="How far the tuned model may move from the base (the reference): the rewards are beta "
        "times its log-probability ratios to the base.",
    )
    loss_type: DpoLossType = Field(
        "sigmoid", description="sigmoid: DPO's loss; robust: with label_smoothing; ipo, hinge: variants."
    )
    label_smoothing: LabelSmoothing = Field(
        0.0, description="robust only: the share of pairs whose preference is assumed to be wrong."
    )

    @model_validator(mode="after")
    def _smoothing_needs_robust(self) -> DpoConfig:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing applies to loss_type 'robust' only; loss_type is '{self.loss_type}'"
            )
        return self

    def as_method(self) -> dict[str, Any]:
        """The job's stored method (`jobs.method`)."""
        return {"type": "dpo", "dpo": {"hyperparameters": self.model_dump(mode="json")}}

    @classmethod
    def of_method(cls, method: dict[str, Any] | None) -> DpoConfig | None:
        """The DPO settings of a stored method; None for a supervised job (null)."""
        return None if method is None else cls.model_validate(method["dpo"]["hyperparameters"])


class DpoHyperparameters(Hyperparameters):
    """`method.dpo.hyperparameters`: OpenAI's shorthand and beta ("auto": 0.1), with phitune's loss_type and
    label_smoothing."""

    beta: Literal["auto"] | Beta = "auto"
    loss_type: DpoLossType = "sigmoid"
    label_smoothing: LabelSmoothing = 0.0

    def as_dpo_config(self) -> DpoConfig:
        """The job's DpoConfig; ValueError when its fields contradict each other."""
        beta = DEFAULT_DPO_BETA if self.beta == "auto" else self.beta
        return DpoConfig(beta=beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing)


HYPERPARAMETER_FIELDS = {
    "num_train_epochs": "n_epochs",
    "per_device_train_batch_size": "batch_size",
    "learning_rate": "learning_rate_multiplier",
}
