"""Where a job trains: PHITUNE_DEVICE, the CPU fallback and its limit, precision, and pinning to one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.internal.contracts import ClaimReply
from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, persona_inputs
from worker import hardware
from worker.devices import gpu_assignment, pin_one_gpu, visible_gpus
from worker.memory_estimate import estimate_training_memory
from worker.recipe import train
from worker.tasks import recipe_inputs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a usable GPU")


@no_cuda
def test_auto_falls_back_to_the_cpu_for_a_small_model_and_says_why() -> None:
    plan = hardware.plan("auto", parameters=10**8)
    assert plan.device == torch.device("cpu")
    assert (plan.dtype, plan.mixed_precision, plan.attention) == (torch.float32, None, "sdpa")
    assert plan.fallback_warning.startswith("CUDA cannot be used (")
    assert hardware.cuda_problem() in plan.fallback_warning


@no_cuda
def test_auto_refuses_the_cpu_for_a_large_model() -> None:
    with pytest.raises(
        hardware.DeviceUnavailable, match=r"3\.8B parameters is too big .* PHITUNE_DEVICE=cpu"
    ):
        hardware.plan("auto", parameters=3_800_000_000)
    assert hardware.plan("cpu", parameters=3_800_000_000).fallback_warning is None  # insisted on


@no_cuda
def test_cuda_fails_fast_with_the_reason() -> None:
    with pytest.raises(hardware.DeviceUnavailable, match="^PHITUNE_DEVICE=cuda, but CUDA cannot be used: "):
        hardware.plan("cuda", parameters=10**6)


def test_bf16_on_the_cpu_is_a_readable_job_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"^training_config\.bf16 is true, but this worker trains on the CPU"
    ):
        hardware.plan("cpu", parameters=10**6, bf16=True)
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=TrainingConfig(bf16=True, max_steps=1),
        peft_config=PeftConfig(),
        output_dir=tmp_path,
        device="cpu",
    )
    with pytest.raises(ValueError, match=r"^training_config\.bf16"):
        train(inputs, Recorder())


def test_the_worker_setting_reaches_every_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", base_models={"tiny-phi3": str(tiny_model_dir)})
    claim = ClaimReply(
        job_id="ftjob-1", attempt=1, token="t", model="tiny-phi3", training_file="file-1",
        validation_file=None, training_config={}, peft_config={}, heartbeat_seconds=10,
    )  # fmt: skip
    inputs = recipe_inputs(claim, settings, tmp_path / "train.jsonl", None, tmp_path)
    assert inputs.device == "cpu" and inputs.base_model == str(tiny_model_dir)


def test_flash_attention_is_used_only_where_it_imports() -> None:
    # flash-attn is not installed here: the import test must say so rather than trust package metadata.
    assert hardware.flash_attention_importable() is False
    assert hardware.attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_a_worker_is_pinned_to_one_gpu() -> None:
    assert pin_one_gpu({}, gpu=None) == "0"
    assert pin_one_gpu({}, gpu=3) == "3"
    assert pin_one_gpu({"CUDA_VISIBLE_DEVICES": "2,5"}, gpu=None) == "2"  # never DataParallel over both
    assert pin_one_gpu({"CUDA_VISIBLE_DEVICES": "2,5"}, gpu=1) == "5"  # --gpu counts the visible ones
    assert pin_one_gpu({"PHITUNE_GPU": "1"}, gpu=None) == "1"
    with pytest.raises(ValueError, match="numbered from 0"):
        pin_one_gpu({"PHITUNE_GPU": "-1"}, gpu=None)
    with pytest.raises(ValueError, match="--gpu 2, but only 2 GPUs are visible"):
        pin_one_gpu({"CUDA_VISIBLE_DEVICES": "2,5"}, gpu=2)


def test_serve_puts_training_and_inference_on_different_gpus() -> None:
    assert gpu_assignment(0) == {}
    assert gpu_assignment(1) == {"worker": 0, "inference": 0}
    assert gpu_assignment(3) == {"worker": 0, "inference": 1}
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}) == ["GPU-a", "GPU-b"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_the_memory_estimate_counts_weights_training_state_and_activations() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000, bias=False), torch.nn.Linear(1000, 10))
    model[0].weight.requires_grad_(False)
    estimate = estimate_training_memory(
        model,
        batch_size=2,
        sequence_length=100,
        hidden_size=1000,
        layers=2,
        vocab_size=10,
        half_precision=False,
        checkpointing=False,
    )
    assert estimate.weights == (1000 * 1000 + 1000 * 10 + 10) * 4
    assert estimate.trained_state == (1000 * 10 + 10) * 12  # fp32 gradient and two AdamW moments
    assert estimate.activations == 34 * 2 * 200 * 1000 * 2 + 2 * 200 * 10 * 4
    assert estimate.describe().startswith("Estimated memory 0.03 GiB (weights 0.00, ")
