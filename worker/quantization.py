"""QLoRA: the base model is loaded quantised by bitsandbytes and LoRA trains on top of it.

bitsandbytes 0.50 and later run 4-bit and 8-bit layers on the CPU too, so QLoRA is tested without a GPU.
The LoRA weights never see the quantisation: the adapter applies to the unquantised base as well.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

Quantization = Literal["4bit", "8bit"]


def bitsandbytes_config(quantization: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """4bit: the QLoRA paper's NF4 with double quantisation, computing in `compute_dtype` (bf16 where the
    hardware has it, fp16 on older GPUs: see `worker.hardware`); 8bit: LLM.int8()."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_quantized_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze the quantised model and upcast its remaining half-precision weights (norms, embeddings) to
    fp32 for stable training. Activation checkpointing is left to the trainer, which enables it when asked."""
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def describe_quantization(quantization: Quantization | None, compute_dtype: torch.dtype) -> str:
    """How `bitsandbytes_config` quantises, for the job's device event; empty without quantisation."""
    if quantization is None:
        return ""
    if quantization == "8bit":
        return ", linear layers in 8bit (LLM.int8)"
    return f", linear layers in 4bit (NF4, computing in {str(compute_dtype).removeprefix('torch.')})"
