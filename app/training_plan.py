"""How many optimizer steps a job runs and how much device memory it needs, computed from its training
config and its examples' token counts without torch: the worker's trainer arrives at the same steps (TRL's
best-fit-decreasing packing, transformers' steps per epoch) and the worker's memory estimate uses the same
arithmetic (`training_memory`, for `worker.memory_estimate`). The API's dry run (`app.jobs.estimate`) calls
both before any GPU time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from app.specs import TrainingConfig

PACKING_BATCH = 1000
"""TRL packs with a batched `datasets.map` of its default batch size: each run of 1000 examples (in file
order, as the trainer leaves them unshuffled) is packed on its own."""

GIB = 1024**3
PREFERENCE_ROWS = 2
"""Rows a preference (DPO) pair takes in a batch: its chosen and its rejected answer, each after the input."""


def packed_rows(lengths: Sequence[int], row_length: int) -> int:
    """Rows of `row_length` tokens that best-fit-decreasing packing fills with examples of `lengths` (each
    at most `row_length`), as `trl.data_utils.pack_dataset(strategy="bfd")` does."""
    rows = 0
    for start in range(0, len(lengths), PACKING_BATCH):
        spaces: list[int] = []  # the free space of each row so far, sorted
        for length in sorted(lengths[start : start + PACKING_BATCH], reverse=True):
            best = bisect.bisect_left(spaces, length)  # the fullest row it fits in
            if best < len(spaces):
                space = spaces.pop(best) - length
            else:
                rows += 1
                space = row_length - length
            if space > 0:
                bisect.insort(spaces, space)
    return rows


def steps_per_epoch(rows: int, config: TrainingConfig) -> int:
    """Optimizer steps of one pass over `rows` training rows: transformers' Trainer on num_processes devices,
    whose batches accelerate deals out in turn (the last ones taken again from the start, so every process
    has as many)."""
    batches = math.ceil(math.ceil(rows / config.per_device_train_batch_size) / config.num_processes)
    accumulation = config.gradient_accumulation_steps
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def total_steps(lengths: Sequence[int], config: TrainingConfig) -> tuple[int, int]:
    """The job's steps and its steps per epoch, for kept examples of `lengths` tokens (truncated)."""
    rows = packed_rows(lengths, config.max_seq_length) if config.packing else len(lengths)
    per_epoch = steps_per_epoch(rows, config)
    if config.max_steps > 0:
        return config.max_steps, per_epoch
    return math.ceil(config.num_train_epochs * per_epoch), per_epoch


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    trained_state: int  # fp32 gradients and AdamW's two fp32 moments of the trained weights
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.trained_state + self.activations

    def describe(self) -> str:
        return (
            f"Estimated memory {self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, "
            f"LoRA training state {self.trained_state / GIB:.2f}, activations {self.activations / GIB:.2f})"
        )


def training_memory(
    *,
    weight_bytes: int,
    trained_parameters: int,
    batch_size: int,
    sequence_length: int,
    hidden_size: int,
    layers: int,
    vocab_size: int,
    half_precision: bool,
    checkpointing: bool,
) -> MemoryEstimate:
    """The estimate (see `worker.memory_estimate`) for weights of `weight_bytes` as loaded (the LoRA weights
    included) of which `trained_parameters` are trained."""
    tokens = batch_size * sequence_length
    scale = 1 if half_precision else 2  # the 34 bytes per element count 2-byte activations
    if checkpointing:
        per_model = (2 * layers + 34) * tokens * hidden_size * scale
    else:
        per_model = 34 * layers * tokens * hidden_size * scale
    logits = 2 * tokens * vocab_size * 4
    return MemoryEstimate(weight_bytes, trained_parameters * (4 + 8), per_model + logits)
