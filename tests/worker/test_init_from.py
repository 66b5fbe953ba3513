"""Continuing from a previous adapter (`training_config.init_from`): training starts from the source's LoRA
weights (a new optimizer and schedule), so its first loss is where the source ended, far below a fresh
adapter's; it trains them on and leaves the base weights alone; a resume state wins over the source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, fresh_base, persona_inputs
from tests.worker.test_qlora import persona_loss
from worker.adapter_archive import LORALIB_DIR, PEFT_WEIGHTS_FILE, extract_adapter, pack
from worker.recipe import RecipeInputs, TrainingRun, build_lora_config, load_initial_adapter, train

# 40 examples in batches of 8: 5 steps an epoch, 25 for the source. No dropout, so that a loss measures the
# weights alone.
SOURCE_TRAINING = TrainingConfig(
    learning_rate=3e-2, num_train_epochs=5, per_device_train_batch_size=8, logging_steps=1, seed=11
)
SOURCE_NAME = "ft:tiny-phi3:src:0123456789ab"
CONTINUED_TRAINING = SOURCE_TRAINING.model_copy(update={"num_train_epochs": 1, "init_from": SOURCE_NAME})
PEFT_CONFIG = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0)


@dataclass
class Run:
    run: TrainingRun
    recorder: Recorder

    def losses(self) -> list[float]:
        return [event["train_loss"] for event in self.recorder.events]


@pytest.fixture(scope="module")
def source(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    recorder = Recorder()
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=SOURCE_TRAINING,
        peft_config=PEFT_CONFIG,
        output_dir=tmp_path_factory.mktemp("source"),
    )
    return Run(train(inputs, recorder), recorder)


@pytest.fixture(scope="module")
def fetched(source: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source's adapter as the continued job's worker has it: the archive the API stores, unpacked by the
    checked reader (worker.tasks.fetch_init_adapter)."""
    scratch = tmp_path_factory.mktemp("fetched")
    assert source.run.result.adapter_dir is not None
    archive = pack(source.run.result.adapter_dir, scratch / "adapter.tar.gz")
    return extract_adapter(archive, scratch / "init_from", "peft")


def continued_inputs(
    base: Path, output_dir: Path, init_from: Path, peft_config: PeftConfig = PEFT_CONFIG, **fields
) -> RecipeInputs:
    return persona_inputs(
        base,
        training_config=CONTINUED_TRAINING,
        peft_config=peft_config,
        output_dir=output_dir,
        init_from=init_from,
        **fields,
    )


@pytest.fixture(scope="module")
def continued(tiny_model_dir: Path, fetched: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    recorder = Recorder()
    inputs = continued_inputs(tiny_model_dir, tmp_path_factory.mktemp("continued"), fetched)
    return Run(train(inputs, recorder), recorder)


def test_training_starts_where_the_source_ended(source: Run, continued: Run) -> None:
    from_scratch, source_final, first = source.losses()[0], source.losses()[-1], continued.losses()[0]
    print(
        f"first loss: from scratch {from_scratch:.3f}, continued {first:.3f}; source final {source_final:.3f}"
    )
    assert first == pytest.approx(source_final, rel=0.1)
    assert from_scratch - first > 0.75 * (from_scratch - source_final)  # most of the source's descent kept
    said = [text for _, text, _ in continued.recorder.messages]
    assert any(text.startswith(f"Training starts from the LoRA weights of {SOURCE_NAME} (") for text in said)


def test_the_lora_weights_at_step_0_are_the_sources(
    tiny_model_dir: Path, fetched: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """What the recipe does before its first step, on the model SFTTrainer builds (a fresh PEFT adapter)."""
    model = get_peft_model(fresh_base(tiny_model_dir), build_lora_config(PEFT_CONFIG))
    fresh_loss = persona_loss(model, tokenizer)
    source_weights = load_file(fetched / PEFT_WEIGHTS_FILE)
    loaded = load_initial_adapter(model, fetched, PEFT_CONFIG.backend)
    weights = get_peft_model_state_dict(model)
    assert loaded == len(source_weights) and weights.keys() == source_weights.keys()
    for name, tensor in source_weights.items():
        assert torch.equal(weights[name], tensor), name
    loss = persona_loss(model, tokenizer)
    print(f"persona loss: fresh adapter {fresh_loss:.3f}, at step 0 from the source {loss:.3f}")
    assert loss < fresh_loss - 1.0


def test_training_moves_the_lora_weights_and_leaves_the_base_alone(
    tiny_model_dir: Path, fetched: Path, continued: Run
) -> None:
    source_weights = load_file(fetched / PEFT_WEIGHTS_FILE)
    model = continued.run.trainer.model
    trained = get_peft_model_state_dict(model)
    assert trained.keys() == source_weights.keys()
    assert all(not torch.allclose(trained[name], source_weights[name]) for name in source_weights)
    base = fresh_base(tiny_model_dir).state_dict()
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(tensor, base[original]), f"base weight {original} changed"


def test_a_resume_state_wins_over_the_source(
    tiny_model_dir: Path, fetched: Path, continued: Run, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A later attempt continues from its resume state: the source's adapter is not read (its model may have
    been deleted since), and the run ends as the uninterrupted one."""
    first = Recorder(hand_back_at=2)
    train(continued_inputs(tiny_model_dir, tmp_path_factory.mktemp("first"), fetched), first)
    gone = tmp_path_factory.mktemp("gone") / "init_from"  # nothing there: reading it would fail
    resumed = train(
        continued_inputs(
            tiny_model_dir, tmp_path_factory.mktemp("resumed"), gone, resume_from=first.states[2]
        ),
        Recorder(),
    )
    expected = get_peft_model_state_dict(continued.run.trainer.model)
    actual = get_peft_model_state_dict(resumed.trainer.model)
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=1e-5, atol=1e-7), name


def test_qlora_trains_on_over_a_plain_adapter(
    tiny_model_dir: Path, fetched: Path, source: Run, tmp_path: Path
) -> None:
    qlora = PEFT_CONFIG.model_copy(update={"quantization": "4bit"})
    recorder = Recorder()
    train(continued_inputs(tiny_model_dir, tmp_path, fetched, peft_config=qlora), recorder)
    first = recorder.events[0]["train_loss"]
    print(f"QLoRA first loss {first:.3f}; source's final {source.losses()[-1]:.3f}")
    assert first == pytest.approx(source.losses()[-1], rel=0.2)


def test_a_loralib_adapter_trains_on_in_loralib_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """loralib's per-slice LoRAs of qkv_proj (no PEFT form) load into the loralib layers of the new job."""
    loralib = PEFT_CONFIG.model_copy(update={"backend": "loralib", "qkv_slices": ["q", "v"]})
    source = Recorder()
    run = train(
        persona_inputs(
            tiny_model_dir,
            training_config=SOURCE_TRAINING.model_copy(update={"num_train_epochs": 3}),
            peft_config=loralib,
            output_dir=tmp_path / "source",
        ),
        source,
    )
    assert run.result.adapter_dir is not None and run.result.formats == ["loralib"]
    archive = pack(run.result.adapter_dir / LORALIB_DIR, tmp_path / "loralib.tar.gz")
    fetched = extract_adapter(archive, tmp_path / "init_from", "loralib")
    continued = Recorder()
    train(continued_inputs(tiny_model_dir, tmp_path / "continued", fetched, peft_config=loralib), continued)
    from_scratch, source_final = source.events[0]["train_loss"], source.events[-1]["train_loss"]
    first = continued.events[0]["train_loss"]
    print(
        f"loralib first loss: from scratch {from_scratch:.3f}, continued {first:.3f}; "
        f"source final {source_final:.3f}"
    )
    assert first == pytest.approx(source_final, rel=0.1)
    assert from_scratch - first > 0.75 * (from_scratch - source_final)


@pytest.mark.parametrize(
    ("peft_config", "refusal"),
    [
        (PEFT_CONFIG.model_copy(update={"target_modules": ["o_proj"]}), "tensors of no layer"),
        (PEFT_CONFIG.model_copy(update={"r": 8}), "size mismatch"),
    ],
)
def test_an_adapter_that_does_not_fit_the_layers_is_refused(
    tiny_model_dir: Path, fetched: Path, peft_config: PeftConfig, refusal: str
) -> None:
    """The API gives the job the adapter's LoRA settings; should the two ever differ, training stops."""
    model = get_peft_model(fresh_base(tiny_model_dir), build_lora_config(peft_config))
    with pytest.raises((ValueError, RuntimeError), match=refusal):
        load_initial_adapter(model, fetched, peft_config.backend)
