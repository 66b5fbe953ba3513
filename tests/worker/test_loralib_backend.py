"""The loralib backend, trained for real: lora.MergedLinear on Phi-3's qkv_proj, lora.Linear elsewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import loralib as lora
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, fresh_base, logits, persona_inputs
from worker.loralib_backend import LoralibConfig, merge_loralib_into
from worker.recipe import TrainingRun, train

TRAINING_CONFIG = TrainingConfig(
    learning_rate=2e-2,
    max_steps=10,
    per_device_train_batch_size=8,
    warmup_ratio=0,
    logging_steps=2,
    save_steps=5,  # not a logging step: the checkpoint makes the recipe log it
    seed=7,
)
# The LoRA paper's setting: the query and value slices of the fused projection, not the key slice.
QV_CONFIG = PeftConfig(backend="loralib", qkv_slices=["q", "v"], r=8, lora_alpha=16, lora_dropout=0.0)
LORALIB_FILES = ["loralib/README.md", "loralib/lora_state_dict.safetensors", "loralib/loralib_config.json"]


def run_loralib(
    model_dir: Path, output_dir: Path, peft_config: PeftConfig, recorder: Recorder
) -> TrainingRun:
    inputs = persona_inputs(
        model_dir,
        training_config=TRAINING_CONFIG,
        peft_config=peft_config,
        output_dir=output_dir,
    )
    run = train(inputs, recorder)
    run.trainer.model.eval()
    return run


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    return run_loralib(tiny_model_dir, tmp_path_factory.mktemp("loralib"), QV_CONFIG, recorder)


def state_dict_of(run: TrainingRun) -> dict[str, torch.Tensor]:
    return load_file(run.result.adapter_dir / "loralib" / "lora_state_dict.safetensors")


def test_loss_falls(run: TrainingRun, recorder: Recorder) -> None:
    assert recorder.events[-1]["train_loss"] < recorder.events[0]["train_loss"] - 1.0


def test_layers_are_loralib_and_only_lora_weights_train(run: TrainingRun) -> None:
    model = run.trainer.model
    for layer in model.model.layers:
        assert type(layer.self_attn.qkv_proj) is lora.MergedLinear
        assert layer.self_attn.qkv_proj.enable_lora == [True, False, True]
        for linear in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert type(linear) is lora.Linear
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # A and B of four projections in each of two layers
    assert all(re.search(r"\.lora_[AB]$", name) for name in trainable)


def test_saved_state_dict_holds_only_the_lora_weights(run: TrainingRun) -> None:
    model = run.trainer.model
    state_dict = state_dict_of(run)
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert state_dict.keys() == trainable.keys()
    for name, tensor in state_dict.items():
        assert torch.equal(tensor, trainable[name]), name
    # Two LoRAs of rank 8 on qkv_proj: one for the q slice, one for the v slice.
    assert state_dict["model.layers.0.self_attn.qkv_proj.lora_A"].shape == (2 * 8, 64)
    assert state_dict["model.layers.0.self_attn.qkv_proj.lora_B"].shape == (2 * 64, 8)


def test_adapter_directory_holds_loralib_and_says_why_not_peft(
    run: TrainingRun, tiny_model_dir: Path
) -> None:
    adapter_dir = run.result.adapter_dir
    assert run.result.formats == ["loralib"]
    files = sorted(str(path.relative_to(adapter_dir)) for path in adapter_dir.rglob("*") if path.is_file())
    assert files == ["PEFT_UNAVAILABLE.txt", "README.md", *LORALIB_FILES]
    reason = (adapter_dir / "PEFT_UNAVAILABLE.txt").read_text()
    assert "qkv_proj" in reason and "format=loralib" in reason
    config = json.loads((adapter_dir / "loralib" / "loralib_config.json").read_text())
    assert config == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "qkv_slices": ["q", "v"],
    }
    guide = (adapter_dir / "loralib" / "README.md").read_text()
    assert "strict=False" in guide and str(tiny_model_dir) in guide


def test_checkpoints_have_the_final_layout(run: TrainingRun, recorder: Recorder) -> None:
    assert [checkpoint["step"] for checkpoint in recorder.checkpoints] == [5, 10]
    steps = {event["step"]: event for event in recorder.events}
    for checkpoint in recorder.checkpoints:
        assert sorted(checkpoint["files"]) == ["PEFT_UNAVAILABLE.txt", "README.md", *LORALIB_FILES]
        assert checkpoint["metrics"]["train_loss"] == steps[checkpoint["step"]]["train_loss"]
        assert checkpoint["metrics"]["valid_loss"] is None  # no validation file
    final = run.result.adapter_dir / "loralib" / "lora_state_dict.safetensors"
    assert recorder.checkpoints[-1]["files"]["loralib/lora_state_dict.safetensors"] == final.read_bytes()


def test_readme_two_step_load_reproduces_the_trained_model(
    run: TrainingRun, tiny_model_dir: Path, persona_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    guide = (run.result.adapter_dir / "loralib" / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL)
    monkeypatch.chdir(run.result.adapter_dir / "loralib")
    namespace: dict = {}
    exec(code, namespace)  # the README's own snippet: base model, then LoRA weights, both strict=False
    reloaded = namespace["model"]
    torch.testing.assert_close(logits(reloaded, persona_ids), logits(run.trainer.model, persona_ids))
    assert not torch.allclose(logits(reloaded, persona_ids), logits(fresh_base(tiny_model_dir), persona_ids))


def test_the_k_slice_of_qkv_proj_stays_the_base_models(
    run: TrainingRun, tiny_model_dir: Path, persona_ids: torch.Tensor
) -> None:
    def first_qkv_output(model: nn.Module) -> torch.Tensor:
        outputs = []
        hook = model.model.layers[0].self_attn.qkv_proj.register_forward_hook(
            lambda module, inputs, output: outputs.append(output)
        )
        logits(model, persona_ids)
        hook.remove()
        return outputs[0]

    # Layer 0's qkv_proj sees the same input in both models: embeddings and norms are frozen.
    trained, base = first_qkv_output(run.trainer.model), first_qkv_output(fresh_base(tiny_model_dir))
    q, k, v = (slice(0, 64), slice(64, 128), slice(128, 192))
    assert torch.equal(trained[..., k], base[..., k])
    assert not torch.allclose(trained[..., q], base[..., q])
    assert not torch.allclose(trained[..., v], base[..., v])


def test_merging_into_a_base_model_reproduces_the_trained_model(
    run: TrainingRun, tiny_model_dir: Path, persona_ids: torch.Tensor
) -> None:
    config = LoralibConfig.from_json((run.result.adapter_dir / "loralib" / "loralib_config.json").read_text())
    merged = merge_loralib_into(fresh_base(tiny_model_dir), state_dict_of(run), config)
    assert all(type(module) is not lora.Linear for module in merged.modules())
    assert not any("lora_" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, persona_ids), logits(run.trainer.model, persona_ids))


def test_merging_refuses_a_state_dict_of_other_layers(run: TrainingRun, tiny_model_dir: Path) -> None:
    config = LoralibConfig.from_peft_config(PeftConfig(backend="loralib", target_modules=["o_proj"], r=8))
    with pytest.raises(
        ValueError, match="holds 12 weights the model lacks, e.g. model.layers.0.self_attn.qkv_proj"
    ):
        merge_loralib_into(fresh_base(tiny_model_dir), state_dict_of(run), config)


def test_plain_linear_layers_convert_exactly_to_peft(
    tiny_model_dir: Path, persona_ids: torch.Tensor, tmp_path: Path
) -> None:
    peft_config = PeftConfig(
        backend="loralib", target_modules=["o_proj", "gate_up_proj", "down_proj"], r=4, lora_alpha=16
    )
    run = run_loralib(tiny_model_dir, tmp_path, peft_config, Recorder())
    adapter_dir = run.result.adapter_dir
    assert run.result.formats == ["loralib", "peft"]
    assert not (adapter_dir / "PEFT_UNAVAILABLE.txt").exists()
    reloaded = PeftModel.from_pretrained(fresh_base(tiny_model_dir), adapter_dir).eval()
    assert reloaded.peft_config["default"].lora_alpha / reloaded.peft_config["default"].r == 4
    converted = logits(reloaded, persona_ids)
    torch.testing.assert_close(converted, logits(run.trainer.model, persona_ids))
    assert not torch.allclose(converted, logits(fresh_base(tiny_model_dir), persona_ids))


def test_trains_under_reentrant_activation_checkpointing(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GPUs checkpoint activations; reentrant checkpointing needs an input that requires grad."""
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=TRAINING_CONFIG.model_copy(
            update={
                "max_steps": 2,
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            }
        ),
        peft_config=QV_CONFIG,
        output_dir=tmp_path,
    )
    run = train(inputs, Recorder())
    assert run.trainer.model.is_activation_checkpointing
    lora_b = [
        parameter for name, parameter in run.trainer.model.named_parameters() if name.endswith("lora_B")
    ]
    assert lora_b and all(parameter.abs().sum() > 0 for parameter in lora_b)  # B starts at zero
