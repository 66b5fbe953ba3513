"""What the worker's hardware supports: it decides precision, attention kernel and gradient checkpointing."""

from __future__ import annotations

import torch
from transformers.utils import is_flash_attn_2_available


def training_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(requested: bool | None) -> bool:
    """bf16 mixed precision: as requested, else only where a GPU computes in bf16 natively."""
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def use_gradient_checkpointing(requested: bool | None) -> bool:
    """Gradient checkpointing: as requested, else on for GPUs (memory bound), off on CPU (compute bound)."""
    return torch.cuda.is_available() if requested is None else requested


def model_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """The dtype to load the base model's weights in: bf16 on a GPU training in bf16, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """FlashAttention-2 where it can run (a CUDA GPU, half precision, the package installed), else SDPA."""
    half_precision = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half_precision and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"
