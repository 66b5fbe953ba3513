"""Loading a base model and its tokenizer, shared by the training recipe and the inference server.

It needs torch and transformers (and bitsandbytes for a quantised model), never the training libraries (TRL,
datasets): the inference server imports it without them.
"""

from __future__ import annotations

import logging

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from worker import hardware
from worker.hardware import DeviceSetting, HardwarePlan
from worker.quantization import Quantization, bitsandbytes_config
from worker.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def count_parameters(architecture: PretrainedConfig) -> int:
    """The number of weights of a model, counted on the meta device: nothing is allocated or read."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    return sum(parameter.numel() for parameter in model.parameters())


def load_base_model(
    name_or_path: str,
    *,
    for_training: bool,
    plan: HardwarePlan | None = None,
    device: DeviceSetting = "auto",
    quantization: Quantization | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer as `plan` says (by default: the plan of `device` for this model, see
    `worker.hardware`). `quantization` ("4bit", "8bit") loads the linear layers quantised by bitsandbytes,
    for QLoRA."""
    if plan is None:
        plan = hardware.plan(device, parameters=count_parameters(AutoConfig.from_pretrained(name_or_path)))
        if plan.fallback_warning:
            log.warning("%s: %s", name_or_path, plan.fallback_warning)
    log.info("%s: %s", name_or_path, plan.describe())
    options = {"dtype": plan.dtype, "attn_implementation": plan.attention}
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **options)
        # transformers wraps `to` in functools.wraps, whose type takes `self` as an explicit first argument.
        model = model.to(plan.device)  # type: ignore[arg-type]
    else:
        # bitsandbytes quantises while loading onto the device; a quantised model cannot be moved afterwards.
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            quantization_config=bitsandbytes_config(quantization, plan.quantized_compute_dtype),
            device_map=plan.device,
            **options,
        )
    if for_training:
        model.config.use_cache = False  # the cache only serves generation and conflicts with checkpointing
    else:
        model.eval()
    tokenizer = load_tokenizer(name_or_path)
    return model, tokenizer
