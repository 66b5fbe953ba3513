"""Preference tuning (DPO) of a job whose method is dpo: the recipe of `worker.recipe` with TRL's DPOTrainer.

The recipe loads the model, reports events, checkpoints, cancels, pauses and resumes as for a supervised job;
this module gives it the preference pairs (`worker.data.load_preference_dataset`) and the trainer. The LoRA
adapter is PEFT's, fresh, and the reference model is the base with that adapter disabled: no second copy of
the weights. A job that continues from an adapter (`training_config.init_from`, a supervised job's model)
trains on from its weights against that adapter as the reference: a frozen copy of its LoRA weights (TRL's
"ref" adapter), still over the one base. Each metrics event carries TRL's rewards
(`app.internal.contracts.DPO_METRICS`) besides the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import SequentialSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from app.internal.contracts import DPO_METRICS
from app.specs import DpoConfig, TrainingConfig
from app.training_plan import PREFERENCE_ROWS
from worker.data import TokenizedPreferences, load_preference_dataset
from worker.hardware import HardwarePlan
from worker.recipe import (
    ProgressReporter,
    RecipeInputs,
    RecipeResult,
    TrainingRun,
    build_lora_config,
    load_initial_adapter,
    train,
    trainer_arguments,
)


def run_dpo(inputs: RecipeInputs, reporter: ProgressReporter) -> RecipeResult:
    """Train and save the LoRA adapter of one preference job attempt; what the Celery task calls."""
    return train_dpo(inputs, reporter).result


def train_dpo(inputs: RecipeInputs, reporter: ProgressReporter) -> TrainingRun:
    """The recipe with DPO, keeping the trainer for callers that inspect the trained model."""
    return train(inputs, reporter, PREFERENCE)


class Preference:
    """DPO on preference pairs with TRL's DPOTrainer."""

    preference = True
    trainer_name = "DPOTrainer"
    metrics: Mapping[str, str] = DPO_METRICS

    def ready(self, model: PreTrainedModel, config: TrainingConfig) -> None:
        """Nothing to adjust: the pairs are batched padded (TRL's DPOTrainer has no padding-free batches)."""

    def load(
        self, path: Path, tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> TokenizedPreferences:
        return load_preference_dataset(path, tokenizer, max_seq_length=config.max_seq_length)

    def batch_shape(self, data: TokenizedPreferences) -> tuple[int, int]:
        dataset = data.dataset
        longest = max(
            len(prompt) + max(len(chosen), len(rejected))
            for prompt, chosen, rejected in zip(
                dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
            )
        )
        return longest, PREFERENCE_ROWS

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
        assert inputs.dpo is not None  # recipe.train checks that the method is the job's
        args = build_dpo_args(
            inputs.training_config,
            inputs.dpo,
            inputs.output_dir / "trainer",
            plan,
            evaluate=eval_dataset is not None,
            checkpointing=checkpointing,
        )
        lora = build_lora_config(inputs.peft_config)
        if inputs.init_from is None:
            # A peft_config and no ref_model: TRL wraps the model in a fresh adapter and takes the reference
            # log-probabilities with the adapter disabled (its use_adapter(model, adapter_name=None)).
            return PreferenceTrainer(
                model=model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                peft_config=lora,
                callbacks=callbacks,
            )
        # A PeftModel holding the adapter continued from: TRL copies it as the frozen "ref" adapter, the
        # reference. A resumed attempt loads it too (worker.tasks), then the trainer its newer weights.
        continued = get_peft_model(model, lora)
        load_initial_adapter(continued, inputs.init_from, inputs.peft_config.backend)
        return PreferenceTrainer(
            model=continued,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    def describe(
        self, data: TokenizedPreferences, trainer: Trainer, config: TrainingConfig
    ) -> tuple[str, dict]:
        pairs = len(data.dataset)
        figures = {
            "examples": pairs,
            "tokens": data.num_tokens,
            "truncated_tokens": data.num_truncated_tokens,
            "dropped_examples": data.num_dropped,
        }
        text = (
            f"{pairs} preference pairs ({data.num_tokens} tokens, the input counted with each answer), "
            f"batched padded; max_seq_length={config.max_seq_length} cut {data.num_truncated_tokens} answer "
            "tokens"
        )
        if data.num_dropped:
            text += f" and dropped {data.num_dropped} pairs whose input fills it"
        return text, figures


PREFERENCE = Preference()


def build_dpo_args(
    config: TrainingConfig,
    dpo: DpoConfig,
    output_dir: Path,
    plan: HardwarePlan,
    *,
    evaluate: bool,
    checkpointing: bool | None = None,
) -> DPOConfig:
    """The DPOTrainer arguments of a job: the recipe's `trainer_arguments` and its DPO settings."""
    return DPOConfig(
        **trainer_arguments(config, output_dir, plan, evaluate=evaluate, checkpointing=checkpointing),
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        # The pairs are cut to max_seq_length already (worker.data); the collator cuts no more.
        max_length=config.max_seq_length,
        padding_free=False,
        # The reference runs alongside each step (the adapter disabled), so that a resumed attempt needs
        # nothing precomputed.
        precompute_ref_log_probs=False,
    )


class PreferenceTrainer(DPOTrainer):
    """DPOTrainer over the pairs `worker.data` tokenised, keeping validation batches in the file's order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL would render the pairs with the chat template again; worker.data's ids are the recipe's.
        return dataset

    def _get_eval_sampler(self, eval_dataset: Dataset) -> SequentialSampler:
        return SequentialSampler(eval_dataset)
