"""Data-parallel jobs, run for real: the tiny Phi-3 trains in 2 gloo ranks launched by torchrun on the CPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from app.specs import PeftConfig, TrainingConfig
from app.training_plan import total_steps
from tests.worker.conftest import PERSONA_FILE, Recorder, persona_inputs
from worker import distributed
from worker.data import load_tokenized_dataset
from worker.devices import pin_gpus
from worker.recipe import RecipeInputs, RecipeResult, run_recipe

# 40 persona examples: 10 steps of 4, as 1 process × batch 4 or 2 processes × batch 2. No dropout, so the two
# differ only by how the gradients are summed.
CONFIG = TrainingConfig(
    learning_rate=2e-2, num_train_epochs=1, warmup_ratio=0, logging_steps=1, save_steps=5, seed=7
)
PEFT_CONFIG = PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0)
WEIGHT_TOLERANCE = 5e-4  # AdamW magnifies float-order differences of the summed gradients
LOSS_TOLERANCE = 1e-4


def inputs(base: Path, scratch: Path, **config) -> RecipeInputs:
    training_config = CONFIG.model_copy(update=config)
    return persona_inputs(
        base, training_config=training_config, peft_config=PEFT_CONFIG, output_dir=scratch / "output"
    )


def ranks_of(scratch: Path) -> list[psutil.Process]:
    """The processes still running a job's ranks (torchrun and its children name its inputs file)."""
    marker = str(scratch / "rank-inputs.pickle")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in (process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def single(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RecipeResult, Recorder]:
    recorder = Recorder()
    started = time.monotonic()
    result = run_recipe(
        inputs(tiny_model_dir, tmp_path_factory.mktemp("single"), per_device_train_batch_size=4), recorder
    )
    print(f"1 process × batch 4: {time.monotonic() - started:.1f} s")
    return result, recorder


@pytest.fixture(scope="module")
def two_ranks(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RecipeResult, Recorder]:
    recorder, scratch = Recorder(), tmp_path_factory.mktemp("ranks")
    started = time.monotonic()
    job = inputs(tiny_model_dir, scratch, per_device_train_batch_size=2, num_processes=2)
    result = distributed.run(job, recorder, worker_devices=2)
    print(f"2 processes × batch 2: {time.monotonic() - started:.1f} s")
    assert ranks_of(scratch) == []
    return result, recorder


def test_two_ranks_train_as_one_process_on_the_same_global_batch(single, two_ranks, tokenizer) -> None:
    (one, one_events), (two, two_events) = single, two_ranks
    examples = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=CONFIG.max_seq_length)
    lengths = [len(ids) for ids in examples.dataset["input_ids"]]
    planned, _ = total_steps(
        lengths, CONFIG.model_copy(update={"per_device_train_batch_size": 2, "num_processes": 2})
    )
    assert two.steps == one.steps == planned == 10
    assert [event["total_steps"] for event in two_events.events] == [10] * 10
    losses_one = [event["train_loss"] for event in one_events.events]
    losses_two = [event["train_loss"] for event in two_events.events]
    print("losses 1 process:", [round(loss, 5) for loss in losses_one])
    print("losses 2 ranks:  ", [round(loss, 5) for loss in losses_two])
    assert losses_two[-1] < losses_two[0] - 0.5
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two, strict=True)) < LOSS_TOLERANCE
    weights_one = load_file(one.adapter_dir / "adapter_model.safetensors")
    weights_two = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    difference = max((weights_one[name] - weights_two[name]).abs().max().item() for name in weights_one)
    changed = max((weights_one[name]).abs().max().item() for name in weights_one if "lora_B" in name)
    print(f"max |ΔLoRA weight| {difference:.2e} (largest lora_B {changed:.2e})")
    assert difference < WEIGHT_TOLERANCE < changed
    # Rank 0 alone reports: one event per step, one checkpoint per save_steps, every rank's tokens counted.
    assert [checkpoint["step"] for checkpoint in two_events.checkpoints] == [5, 10]
    assert two.trained_tokens == one.trained_tokens


def test_a_cancel_stops_every_rank_at_the_same_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    recorder = Recorder(stop_after=3)
    job = inputs(
        tiny_model_dir, tmp_path, per_device_train_batch_size=2, num_processes=2, num_train_epochs=20
    )
    result = distributed.run(job, recorder, worker_devices=2)
    assert result.cancelled and result.steps == 3
    assert ranks_of(tmp_path) == []


class Stuck(Recorder):
    """A reporter whose API hangs on the first metrics event, after which the job is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = threading.Event()

    def on_metrics(self, metrics: dict) -> None:
        self.cancelled.set()
        time.sleep(3)  # the ranks wait for this answer in a collective: only the kill stops them

    def should_stop(self) -> bool:
        return self.cancelled.is_set()


def test_ranks_that_do_not_stop_are_killed_as_a_group(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributed, "STOP_GRACE_SECONDS", 0.5)
    job = inputs(
        tiny_model_dir, tmp_path, per_device_train_batch_size=2, num_processes=2, num_train_epochs=20
    )
    result = distributed.run(job, Stuck(), worker_devices=2)
    assert result.cancelled and result.adapter_dir is None
    assert ranks_of(tmp_path) == []


def test_a_job_asking_more_processes_than_the_worker_owns_fails_before_training(tmp_path: Path) -> None:
    job = inputs(Path("never-loaded"), tmp_path, num_processes=2)
    with pytest.raises(
        distributed.TooFewDevices, match=r"num_processes is 2, but this worker owns 1 device "
    ):
        distributed.run(job, Recorder(), worker_devices=1)


def test_a_worker_owning_several_gpus_is_pinned_to_them_from_its_first() -> None:
    assert pin_gpus({}, gpu=2, count=2) == "2,3"
    assert pin_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, gpu=1, count=3) == "5,6,7"
    assert pin_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}, gpu=None, count=1) == "4"
    with pytest.raises(ValueError, match="only 1 GPUs are left"):
        pin_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}, gpu=1, count=2)
