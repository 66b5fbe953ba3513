"""A job's device memory: estimated before its first step, for the event that says where it trains, and
measured after its last (`measured_peak`).

An estimate, not a measurement (its arithmetic is `app.training_plan.training_memory`, which the API's dry
run uses too): weights as loaded, plus gradients and AdamW's two moments of the trained (LoRA) weights,
plus the activations of one micro-batch of full-length sequences. Activations follow Korthikanti et al.
(2022), "Reducing Activation Recomputation in Large Transformer Models": 34·s·h bytes per layer and sequence
in half precision with a fused attention kernel (no s² scores kept), doubled in fp32; with gradient
checkpointing each layer keeps only its input (2·s·h bytes), plus one layer recomputed. The fp32 logits and
their gradient (2 · s · vocab · 4 bytes) come on top.

The estimate also decides gradient checkpointing when the job leaves it unset (`decide_checkpointing`): off on
the CPU, which is compute bound; on a GPU off when training without it is estimated to fit in the free memory
(with a margin), else on, since recomputing the activations costs about a third more compute per step.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from torch import nn

# The arithmetic is the API's too (its dry run estimates without torch): defined there.
from app.training_plan import GIB, MemoryEstimate, training_memory


def estimate_training_memory(
    model: nn.Module,
    *,
    trained_parameters: int | None = None,
    batch_size: int,
    sequence_length: int,
    hidden_size: int,
    layers: int,
    vocab_size: int,
    half_precision: bool,
    checkpointing: bool,
) -> MemoryEstimate:
    """The estimate for `model` with its LoRA layers added, so that its trained weights require grad; or for
    `model` before they are added, given the number of `trained_parameters` they will have (whose own weights
    are then counted in the training state)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    if trained_parameters is None:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        weights += trained_parameters * 4  # the fp32 LoRA weights themselves
        trained = trained_parameters
    return training_memory(
        weight_bytes=weights,
        trained_parameters=trained,
        batch_size=batch_size,
        sequence_length=sequence_length,
        hidden_size=hidden_size,
        layers=layers,
        vocab_size=vocab_size,
        half_precision=half_precision,
        checkpointing=checkpointing,
    )


CHECKPOINTING_MARGIN = 0.8
"""The share of the free device memory an estimate may fill for checkpointing to stay off: the allocator's
fragmentation, kernels' workspaces and the estimate's own error take the rest."""


@dataclass(frozen=True)
class CheckpointingDecision:
    enabled: bool
    reason: str
    estimate: MemoryEstimate  # of training without checkpointing
    free_bytes: int | None  # the device's free memory when decided (a GPU's; None on the CPU)

    def describe(self) -> str:
        return f"{self.estimate.describe()} without gradient checkpointing; {self.reason}"

    def figures(self) -> dict:
        return {
            "gradient_checkpointing": self.enabled,
            "estimated_memory_bytes": self.estimate.total,
            "free_memory_bytes": self.free_bytes,
        }


def decide_checkpointing(
    requested: bool | None, device: torch.device, estimate: MemoryEstimate, free_bytes: int | None
) -> CheckpointingDecision:
    """Gradient checkpointing as `requested`, else off on the CPU, and on a GPU off exactly when `estimate`
    (training without it) fits in the margin; the weights are loaded already: `free_bytes` excludes them."""
    on_off = {True: "on", False: "off"}
    if requested is not None:
        reason = f"gradient checkpointing {on_off[requested]}, as training_config.gradient_checkpointing asks"
        return CheckpointingDecision(requested, reason, estimate, free_bytes)
    if device.type != "cuda" or free_bytes is None:
        reason = "gradient checkpointing off: the CPU is compute bound, and recomputing would only slow it"
        return CheckpointingDecision(False, reason, estimate, free_bytes)
    needed = estimate.total - estimate.weights
    enabled = needed > CHECKPOINTING_MARGIN * free_bytes
    fits = "does not fit" if enabled else "fits"
    reason = (
        f"gradient checkpointing {on_off[enabled]}: the {needed / GIB:.2f} GiB beyond the weights {fits} in "
        f"{CHECKPOINTING_MARGIN:.0%} of the GPU's {free_bytes / GIB:.2f} GiB free"
    )
    return CheckpointingDecision(enabled, reason, estimate, free_bytes)


def free_memory(device: torch.device) -> int | None:
    """The free memory of a GPU, None for the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def reset_peak(device: torch.device) -> None:
    """Start measuring the peak from now (CUDA; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measured_peak(device: torch.device) -> tuple[str, dict]:
    """The peak memory since `reset_peak`: what torch allocated on a GPU, else the process's peak RSS. A text
    and the figures, for an event."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        text = f"Peak device memory {allocated / GIB:.2f} GiB allocated ({reserved / GIB:.2f} GiB reserved)"
        return text, {"peak_memory_bytes": allocated, "peak_reserved_bytes": reserved, "device": str(device)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return f"Peak memory {peak / GIB:.2f} GiB (the worker process's resident set since it started)", {
        "peak_memory_bytes": peak,
        "device": "cpu",
    }
