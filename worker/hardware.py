"""Where a process trains or serves, and how: device, weight dtype, mixed precision, attention kernel.

Decided once per job (or per served model) by `plan()`, from `PHITUNE_DEVICE` and what the hardware
supports, and said in the job's first event, so that a GPU that failed to start never turns silently into a
3.8B model training in fp32 on the CPU:

- `PHITUNE_DEVICE=cuda` uses the GPU or fails with the reason CUDA is unusable;
- `cpu` uses the CPU;
- `auto` (default) uses the GPU when CUDA works, else the CPU with a warning, but only for models of at most
  `CPU_FALLBACK_MAX_PARAMETERS` (a bigger model fails with the reason instead).

A process sees one GPU: the worker and the inference server are pinned to theirs through
`CUDA_VISIBLE_DEVICES` before torch loads (`worker.devices`), so the trainer never wraps the model in
`nn.DataParallel` and a job's batch and learning-rate schedule do not depend on the host.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Literal

import torch

DeviceSetting = Literal["auto", "cuda", "cpu"]
MixedPrecision = Literal["bf16", "fp16"]

CPU_FALLBACK_MAX_PARAMETERS = 1_000_000_000
"""`PHITUNE_DEVICE=auto` falls back to the CPU only for models this small (the tiny and test models); a
larger one would train for days, so the job fails with CUDA's problem instead."""


class DeviceUnavailable(RuntimeError):
    """The configured device cannot be used; the message says why and what to change."""


@dataclass(frozen=True)
class HardwarePlan:
    """How one model is trained or served on this machine."""

    device: torch.device
    dtype: torch.dtype  # the base weights (a quantised model: its non-quantised parts)
    mixed_precision: MixedPrecision | None  # the trainer's autocast; None: full precision
    attention: str  # transformers' attn_implementation
    device_name: str
    has_bf16: bool  # the device computes in bf16 natively (a CPU counts: bitsandbytes' kernels do)
    fallback_warning: str | None = None  # why auto chose the CPU

    @property
    def quantized_compute_dtype(self) -> torch.dtype:
        """QLoRA's compute dtype: bf16 where the hardware has it, fp16 on GPUs without it."""
        return torch.bfloat16 if self.has_bf16 else torch.float16

    def describe(self) -> str:
        """One line for the job's events and the server's log."""
        precision = f"{self.mixed_precision} mixed precision" if self.mixed_precision else "full precision"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"Device {self.device} ({self.device_name}), weights {dtype}, {precision}, "
            f"attention {self.attention}"
        )


def plan(setting: DeviceSetting, *, parameters: int, bf16: bool | None = None) -> HardwarePlan:
    """The plan for a model of `parameters` weights; `bf16` is the job's training_config.bf16 (None: choose).

    Raises DeviceUnavailable when the setting cannot be met, ValueError when bf16 was asked for on hardware
    without it."""
    device, warning = select_device(setting, parameters)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # Without excluding emulation, Volta and Turing answer True and would train bf16 slowly in software.
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        hardware = f"the GPU {name}"
    else:
        name, has_bf16, hardware = "CPU", False, "the CPU"
    if bf16 and not has_bf16:
        raise ValueError(
            f"training_config.bf16 is true, but this worker trains on {hardware}, which has no bf16 mixed "
            "precision; leave bf16 unset to let the worker choose (fp16 on GPUs without bf16, fp32 on the "
            "CPU), or set it to false"
        )
    mixed: MixedPrecision | None
    if device.type == "cpu" or bf16 is False:
        dtype, mixed = torch.float32, None
    elif has_bf16:
        dtype, mixed = torch.bfloat16, "bf16"
    else:  # pre-Ampere GPUs: fp16 weights, fp16 autocast with loss scaling (the LoRA weights stay fp32)
        dtype, mixed = torch.float16, "fp16"
    attention = attention_implementation(device, dtype)
    return HardwarePlan(device, dtype, mixed, attention, name, has_bf16 or device.type == "cpu", warning)


def select_device(setting: DeviceSetting, parameters: int) -> tuple[torch.device, str | None]:
    """The device `setting` means here, and a warning when auto fell back to the CPU."""
    if setting == "cpu":
        return torch.device("cpu"), None
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", torch.cuda.current_device()), None
    if setting == "cuda":
        raise DeviceUnavailable(f"PHITUNE_DEVICE=cuda, but CUDA cannot be used: {problem}")
    if parameters > CPU_FALLBACK_MAX_PARAMETERS:
        raise DeviceUnavailable(
            f"CUDA cannot be used ({problem}), and a model of {parameters / 1e9:.1f}B parameters is too big "
            f"to train on the CPU (PHITUNE_DEVICE=auto falls back to it up to "
            f"{CPU_FALLBACK_MAX_PARAMETERS / 1e9:.1f}B); fix the GPU, or set PHITUNE_DEVICE=cpu to insist"
        )
    return torch.device("cpu"), f"CUDA cannot be used ({problem}); running on the CPU"


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or None when it can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    try:
        torch.cuda.init()
    except Exception as error:  # driver mismatch, no driver, a broken device
        return f"CUDA failed to start: {error}"
    if torch.cuda.device_count() == 0:
        return "no GPU is visible to this process (check --gpus and CUDA_VISIBLE_DEVICES)"
    return None


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """FlashAttention-2 where it runs (an Ampere or newer GPU, half precision, a flash-attn build that
    imports against this torch), else PyTorch's SDPA."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if torch.cuda.get_device_capability(device)[0] < 8 or not flash_attention_importable():
        return "sdpa"
    return "flash_attention_2"


@functools.cache
def flash_attention_importable() -> bool:
    """True when flash-attn's compiled kernels load: a wheel built for another torch or CUDA is installed
    fine but fails here (undefined symbols), and would otherwise crash the first forward pass."""
    try:
        importlib.import_module("flash_attn")
        importlib.import_module("flash_attn_2_cuda")
    except Exception:
        return False
    return True
