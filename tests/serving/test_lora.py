"""Per-row LoRA: the logits of PeftModel for every row, and only plain LoRA adapters accepted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.serving.conftest import ADAPTERS, References, exact_only_on_cpu, load_model
from worker.serving.lora import InvalidAdapter, MultiLora, read_adapter

CPU = torch.device("cpu")  # where the refused adapters would have gone


@pytest.fixture(scope="module")
def multi_lora(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> tuple[torch.nn.Module, MultiLora]:
    """The tiny model with the three test adapters in slots 1, 2 and 3."""
    model = load_model(tiny_model_dir)
    lora = MultiLora(model)
    for slot, adapter_id in enumerate(ADAPTERS, start=1):
        lora.install(slot, read_adapter(adapter_dirs[adapter_id], lora.linear_shapes, model.device))
    return model, lora


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@exact_only_on_cpu
def test_each_row_gets_the_logits_of_its_peft_model(
    multi_lora: tuple[torch.nn.Module, MultiLora], references: References
) -> None:
    model, lora = multi_lora
    ids = torch.randint(5, 800, (4, 12), generator=torch.Generator().manual_seed(0)).to(model.device)
    adapters = [None, *ADAPTERS]
    expected = [logits(references.model(adapter), ids[row : row + 1]) for row, adapter in enumerate(adapters)]
    for row, slot in enumerate(range(4)):  # one adapter per batch: PEFT's arithmetic, to the bit
        lora.select_rows([slot])
        assert torch.equal(logits(model, ids[row : row + 1]), expected[row])
    lora.select_rows([0, 1, 2, 3])  # the base model and three adapters of different ranks in one batch
    mixed = logits(model, ids)
    for row in range(4):
        torch.testing.assert_close(mixed[row : row + 1], expected[row], rtol=1e-5, atol=1e-5)


@exact_only_on_cpu
def test_each_adapters_rows_are_grouped_and_get_its_peft_logits(
    multi_lora: tuple[torch.nn.Module, MultiLora], references: References
) -> None:
    model, lora = multi_lora
    slots = [0, 0, 1, 1, 1, 3]  # several rows per adapter; slot 2 has none
    ids = torch.randint(5, 800, (len(slots), 7), generator=torch.Generator().manual_seed(2)).to(model.device)
    lora.select_rows(slots)
    mixed = logits(model, ids)
    adapters = [None, *ADAPTERS]
    for row, slot in enumerate(slots):
        expected = logits(references.model(adapters[slot]), ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sorted by adapter slot"):
        lora.select_rows([2, 1])


def test_adapters_apply_in_the_models_dtype(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_model_dir).to(torch.bfloat16)
    lora = MultiLora(model)
    lora.install(1, read_adapter(adapter_dirs["ftjob-plain"], lora.linear_shapes, model.device))
    assert {layer._a.dtype for layer in lora._layers.values()} == {torch.bfloat16}
    ids = torch.randint(5, 800, (2, 9), generator=torch.Generator().manual_seed(3)).to(model.device)
    results = {}
    for slots in ([0, 0], [1, 1], [0, 1]):  # the base model, one adapter, a mixed batch
        lora.select_rows(slots)
        results[tuple(slots)] = logits(model, ids)
    assert {result.dtype for result in results.values()} == {torch.bfloat16}
    base, adapted, mixed = results.values()
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0.02, atol=0.05)
    assert not torch.allclose(adapted[1], base[1], rtol=0.02, atol=0.05)


@exact_only_on_cpu
def test_a_removed_adapter_leaves_its_slot_to_the_base_model(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], references: References
) -> None:
    model = load_model(tiny_model_dir)
    lora = MultiLora(model)
    lora.install(1, read_adapter(adapter_dirs["ftjob-plain"], lora.linear_shapes, model.device))
    lora.install(2, read_adapter(adapter_dirs["ftjob-attention"], lora.linear_shapes, model.device))
    lora.remove(1)
    ids = torch.randint(5, 800, (2, 9), generator=torch.Generator().manual_seed(1)).to(model.device)
    lora.select_rows([1, 2])
    mixed = logits(model, ids)
    torch.testing.assert_close(mixed[:1], logits(references.model(None), ids[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        mixed[1:], logits(references.model("ftjob-attention"), ids[1:]), rtol=1e-5, atol=1e-5
    )


def edited_adapter(
    source: Path, target: Path, config: dict | None = None, tensors: dict | None = None
) -> Path:
    """A copy of `source` with adapter_config.json fields and safetensors tensors replaced or added."""
    shutil.copytree(source, target)
    fields = json.loads((target / "adapter_config.json").read_text()) | (config or {})
    (target / "adapter_config.json").write_text(json.dumps(fields))
    weights = load_file(target / "adapter_model.safetensors") | (tensors or {})
    save_file(weights, target / "adapter_model.safetensors")
    return target


@pytest.mark.parametrize(
    ("config", "tensors", "reason"),
    [
        ({"use_dora": True}, None, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"lora_bias": True}, None, "lora_bias"),
        ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
        ({"peft_type": "IA3"}, None, "only LoRA"),
        ({"a_future_peft_feature": {"on": True}}, None, "a_future_peft_feature"),
        ({"r": 16}, None, "do not fit"),
        (None, {"base_model.model.lm_head.weight": torch.zeros(896, 64)}, "only lora_A and lora_B"),
        (
            None,
            {"base_model.model.model.layers.0.mlp.nothing.lora_A.weight": torch.zeros(8, 64)},
            "lacks lora_A or lora_B",
        ),
    ],
)
def test_anything_but_plain_lora_is_refused(
    multi_lora: tuple[torch.nn.Module, MultiLora],
    adapter_dirs: dict[str, Path],
    tmp_path: Path,
    config: dict | None,
    tensors: dict | None,
    reason: str,
) -> None:
    adapter = edited_adapter(adapter_dirs["ftjob-plain"], tmp_path / "adapter", config, tensors)
    read_adapter(adapter_dirs["ftjob-plain"], multi_lora[1].linear_shapes, CPU)  # the original is fine
    with pytest.raises(InvalidAdapter, match=reason):
        read_adapter(adapter, multi_lora[1].linear_shapes, CPU)


def test_an_adapter_for_another_model_is_refused(adapter_dirs: dict[str, Path]) -> None:
    with pytest.raises(InvalidAdapter, match="no linear layer"):
        read_adapter(adapter_dirs["ftjob-plain"], {"model.layers.0.mlp.down_proj": (128, 64)}, CPU)
