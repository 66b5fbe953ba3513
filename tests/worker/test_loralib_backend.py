"""The loralib backend, trained for real: a lora.MergedLinear on Phi-3's qkv_proj, lora.Linear elsewhere;
and that LowRankMergedLinear computes what loralib's MergedLinear does, without its dense ΔW."""

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
from torch.utils.flop_counter import FlopCounterMode

from app.specs import PeftConfig, TrainingConfig
from tests.loralib_reference import merge_loralib_into
from tests.worker.conftest import Recorder, fresh_base, logits, persona_inputs
from worker.loralib_backend import LoralibConfig
from worker.loralib_layers import LowRankMergedLinear
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
        assert type(layer.self_attn.qkv_proj) is LowRankMergedLinear
        assert isinstance(layer.self_attn.qkv_proj, lora.MergedLinear)
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


ENABLE_LORA = [[True, True, True], [True, False, True], [False, True, False]]


def merged_linear_pair(
    enable_lora: list[bool], *, r: int = 4, device: str = "cpu", shape: tuple[int, int] = (32, 48), **options
) -> tuple[lora.MergedLinear, LowRankMergedLinear]:
    """loralib's MergedLinear with random weights and a LowRankMergedLinear holding the same ones."""
    torch.manual_seed(0)
    options = {"r": r, "lora_alpha": 8, "enable_lora": enable_lora, "device": device, **options}
    reference = lora.MergedLinear(*shape, **options)
    if hasattr(reference, "lora_B") and device != "meta":
        nn.init.normal_(reference.lora_B)  # loralib starts B at zero, which would hide a wrong update
    low_rank = LowRankMergedLinear(*shape, **options)
    low_rank.load_state_dict(reference.state_dict())
    return reference, low_rank


def output_and_grads(layer: nn.Module, x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """The layer's output on `x`, and the gradients of a fixed random loss of it."""
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the dropout mask, when there is dropout
    output = layer(x)
    output.backward(torch.randn_like(output, generator=torch.Generator().manual_seed(2)))
    grads = {name: parameter.grad for name, parameter in layer.named_parameters() if parameter.requires_grad}
    return {"output": output.detach(), "x": x.grad, **grads}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 relative in float32 (1e-12 in float64), or to a millionth (1e-13) of the tensor's
    largest entry: the two sum the same products in different orders, which moves an entry that cancels to
    near zero by a few ulps of the largest terms, not of itself."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        atol, rtol = (1e-6, 1e-5) if tensor.dtype == torch.float32 else (1e-13, 1e-12)
        torch.testing.assert_close(
            actual[name],
            tensor,
            atol=atol * tensor.abs().max().item(),
            rtol=rtol,
            msg=lambda message, name=name: f"{name}: {message}",
        )


@pytest.mark.parametrize("enable_lora", ENABLE_LORA)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_merged_linear_matches_loralib(
    enable_lora: list[bool], bias: bool, fan_in_fan_out: bool, dtype: torch.dtype
) -> None:
    """Same output and gradients; float64 shows that only rounding separates them."""
    reference, low_rank = merged_linear_pair(
        enable_lora, bias=bias, fan_in_fan_out=fan_in_fan_out, dtype=dtype
    )
    x = torch.randn(2, 7, 32, dtype=dtype)
    expected = output_and_grads(reference, x)
    assert {"lora_A", "lora_B", "x"} <= expected.keys() and "weight" not in expected
    assert_same(output_and_grads(low_rank, x), expected)


@pytest.mark.parametrize("enable_lora", ENABLE_LORA)
def test_low_rank_merged_linear_draws_the_same_dropout(enable_lora: list[bool]) -> None:
    """Both draw one mask over the input, at the same point, so the same seed drops the same features."""
    reference, low_rank = merged_linear_pair(enable_lora, lora_dropout=0.5)
    x = torch.randn(2, 7, 32)
    expected = output_and_grads(reference, x)
    assert_same(output_and_grads(low_rank, x), expected)
    assert not torch.allclose(output_and_grads(low_rank, x, seed=3)["output"], expected["output"])


@pytest.mark.parametrize("enable_lora", ENABLE_LORA)
def test_low_rank_merged_linear_matches_loralib_under_bf16_autocast(enable_lora: list[bool]) -> None:
    """How the recipe trains on a GPU: a bf16 base, fp32 LoRA weights, bf16 autocast."""
    reference, low_rank = merged_linear_pair(enable_lora, shape=(256, 384))
    for layer in (reference, low_rank):
        layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    x = torch.randn(2, 64, 256, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = output_and_grads(reference, x), output_and_grads(low_rank, x)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        # bf16 keeps 8 bits: products rounded at different points differ by about one ulp of the largest.
        torch.testing.assert_close(
            actual[name].float(), tensor.float(), atol=1e-2 * tensor.abs().max().item(), rtol=0
        )


@pytest.mark.parametrize("enable_lora", ENABLE_LORA)
def test_low_rank_merged_linear_merges_as_loralib(enable_lora: list[bool]) -> None:
    reference, low_rank = merged_linear_pair(enable_lora, merge_weights=True)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        unmerged = low_rank(x)
        reference.train(False), low_rank.train(False)  # loralib adds B·A·scaling to the weight
        assert reference.merged and low_rank.merged
        torch.testing.assert_close(low_rank(x), reference(x), atol=0, rtol=0)
        torch.testing.assert_close(low_rank(x), unmerged, atol=1e-5, rtol=1e-5)
        low_rank.train(True)  # and subtracts it again
        assert not low_rank.merged
        torch.testing.assert_close(low_rank(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("r", "enable_lora"), [(0, [True, False, True]), (4, [False, False, False])])
def test_low_rank_merged_linear_without_a_lora_is_the_base_layer(r: int, enable_lora: list[bool]) -> None:
    """As loralib's with r == 0; with no enabled slice loralib's own raises (it multiplies by a missing A)."""
    reference, low_rank = merged_linear_pair(enable_lora, r=r, lora_dropout=0.5)
    assert not any(name.startswith("lora_") for name, _ in low_rank.named_parameters())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(low_rank(x), nn.functional.linear(x, low_rank.weight, low_rank.bias))
    if r == 0:
        torch.testing.assert_close(low_rank(x), reference(x), atol=0, rtol=0)


def flops(layer: nn.Module, x: torch.Tensor, *, backward: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        output = layer(x)
        if backward:
            output.sum().backward()
    return counter.get_total_flops()


def test_low_rank_merged_linear_does_not_build_the_dense_update() -> None:
    """Phi-3-mini's qkv_proj, q and v adapted, at 1024 tokens, counted on the meta device (shapes only)."""
    r, tokens, (in_features, out_features) = 16, 1024, (3072, 3 * 3072)
    reference, low_rank = merged_linear_pair(
        [True, False, True], r=r, device="meta", shape=(in_features, out_features)
    )
    x = torch.empty(1, tokens, in_features, device="meta", requires_grad=True)
    base = 2 * tokens * in_features * out_features
    # x·Aᵀ, then that times the out × 2r block-structured B, zeros and all
    low_rank_path = 2 * tokens * 2 * r * in_features + 2 * tokens * 2 * r * out_features
    assert flops(low_rank, x) == base + low_rank_path < 1.02 * base
    # Forward and backward: the input's gradient through W, and two gradients of each low-rank matmul.
    assert flops(low_rank, x, backward=True) == 2 * base + 3 * low_rank_path
    # loralib multiplies the input by the out × in ΔW: a second matmul as large as the base one.
    assert flops(reference, x) > 2 * base
