"""loralib adapters and QLoRA's bf16 PEFT adapters, served: greedy completions equal the base model with the
loralib adapter merged in (`merge_loralib_into`), or PeftModel's, alone and in batches mixed with PEFT."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import loralib as lora
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from tests.loralib_reference import merge_loralib_into
from tests.serving.conftest import (
    BASE_MODEL,
    SERVING_TOKEN,
    InferenceServer,
    References,
    exact_only_on_cpu,
    generate_body,
    load_model,
)
from tests.serving.stub_store import adapter_store_app, serve_in_thread
from worker.adapter_archive import LORALIB_CONFIG_FILE, LORALIB_DIR, LORALIB_STATE_DICT_FILE, pack
from worker.loralib_backend import LoralibConfig, add_lora_layers, save_adapter
from worker.serving.loralib_adapter import read_loralib_adapter
from worker.tiny_model import make_random_adapter

ALL_LINEAR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# The LoRA paper's query and value slices only; and every slice plus every other projection.
LORALIB_CONFIGS = {
    "ftjob-loralib-qv": LoralibConfig(4, 8, 0.0, "none", ["qkv_proj"], ["q", "v"]),
    "ftjob-loralib-all": LoralibConfig(4, 8, 0.0, "none", ALL_LINEAR, ["q", "k", "v"]),
}
LORALIB_ADAPTERS = list(LORALIB_CONFIGS)
BF16_ADAPTER = "ftjob-qlora-bf16"  # PEFT weights in bf16, as TRL saves a QLoRA adapter
PEFT_ADAPTER = "ftjob-plain"  # conftest's
BIAS_ADAPTER = "ftjob-loralib-bias"
UNKNOWN_FORMAT_ADAPTER = "ftjob-unknown-format"
PROMPTS = ["Hello!", "How do I update the firmware, and what does the warranty cover? " * 2]


def make_loralib_adapter(model_dir: Path, adapter_dir: Path, config: LoralibConfig, seed: int) -> Path:
    """Save a loralib adapter as the backend does, with random, non-zero B (loralib's starts at zero)."""
    model = load_model(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora_layers(model, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.normal_(0, 0.5)
    save_adapter(model, adapter_dir, config, BASE_MODEL)
    return adapter_dir / LORALIB_DIR


def with_trained_bias(loralib_dir: Path, target: Path) -> Path:
    """A copy of a loralib adapter that also trained a bias (`bias="all"` over a layer that has one)."""
    shutil.copytree(loralib_dir, target)
    config = LoralibConfig.from_json((target / LORALIB_CONFIG_FILE).read_text())
    (target / LORALIB_CONFIG_FILE).write_text(dataclasses.replace(config, bias="all").to_json())
    state_dict = load_file(target / LORALIB_STATE_DICT_FILE)
    state_dict["model.layers.0.self_attn.qkv_proj.bias"] = torch.ones(192)  # the tiny qkv_proj outputs
    save_file(state_dict, target / LORALIB_STATE_DICT_FILE)
    return target


def in_bf16(adapter_dir: Path) -> Path:
    """The PEFT adapter with its weights stored in bf16."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    save_file(
        {key: tensor.bfloat16() for key, tensor in weights.items()}, adapter_dir / "adapter_model.safetensors"
    )
    return adapter_dir


@pytest.fixture(scope="module")
def loralib_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loralib-adapters")
    dirs = {
        adapter_id: make_loralib_adapter(tiny_model_dir, root / adapter_id, config, seed)
        for seed, (adapter_id, config) in enumerate(LORALIB_CONFIGS.items(), start=11)
    }
    return dirs | {BIAS_ADAPTER: with_trained_bias(dirs["ftjob-loralib-qv"], root / BIAS_ADAPTER)}


@pytest.fixture(scope="module")
def bf16_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return in_bf16(
        make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("bf16") / BF16_ADAPTER, seed=5)
    )


@pytest.fixture(scope="module")
def loralib_server(
    start_server: Callable[..., InferenceServer],
    archives: dict[str, Path],
    loralib_dirs: dict[str, Path],
    bf16_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InferenceServer]:
    """An inference server whose store sends the loralib archives, packed as the worker uploads them."""
    root = tmp_path_factory.mktemp("loralib-archives")
    packed = {
        adapter_id: pack(path, root / f"{adapter_id}.tar.gz") for adapter_id, path in loralib_dirs.items()
    }
    store = packed | {
        PEFT_ADAPTER: archives[PEFT_ADAPTER],
        BF16_ADAPTER: pack(bf16_dir, root / f"{BF16_ADAPTER}.tar.gz"),
        UNKNOWN_FORMAT_ADAPTER: packed["ftjob-loralib-qv"],
    }
    formats = dict.fromkeys(packed, "loralib") | {UNKNOWN_FORMAT_ADAPTER: "gguf"}
    with serve_in_thread(adapter_store_app(store, SERVING_TOKEN, formats)) as store_url:
        yield start_server(8, store_url)


@pytest.fixture(scope="module")
def merged_references(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    loralib_dirs: dict[str, Path],
    bf16_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
) -> References:
    """PeftModel for the PEFT adapters; the base model with the adapter merged in for the loralib ones."""
    references = References(
        tiny_model_dir, {PEFT_ADAPTER: adapter_dirs[PEFT_ADAPTER], BF16_ADAPTER: bf16_dir}, tokenizer
    )
    for adapter_id in LORALIB_ADAPTERS:
        config = LoralibConfig.from_json((loralib_dirs[adapter_id] / LORALIB_CONFIG_FILE).read_text())
        state_dict = load_file(loralib_dirs[adapter_id] / LORALIB_STATE_DICT_FILE)
        references.add(adapter_id, merge_loralib_into(load_model(tiny_model_dir), state_dict, config))
    return references


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("enable_lora", [[True, False, True], [True, True, True], [False, True, False]])
def test_a_merged_linear_reads_as_one_block_lora(enable_lora: list[bool], tmp_path: Path) -> None:
    layer = lora.MergedLinear(16, 24, r=2, lora_alpha=6, enable_lora=enable_lora, merge_weights=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    config = LoralibConfig(
        2, 6, 0.0, "none", ["qkv_proj"], [s for s, on in zip("qkv", enable_lora, strict=True) if on]
    )
    save_file(
        {"qkv_proj.lora_A": layer.lora_A.detach(), "qkv_proj.lora_B": layer.lora_B.detach()},
        tmp_path / LORALIB_STATE_DICT_FILE,
    )
    (tmp_path / LORALIB_CONFIG_FILE).write_text(config.to_json())
    module = read_loralib_adapter(tmp_path, {"qkv_proj": (16, 24)}, torch.device("cpu")).modules["qkv_proj"]
    assert module.rank == 2 * sum(enable_lora)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = layer(x) - F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(F.linear(F.linear(x, module.a), module.b) * module.scaling, expected)


@exact_only_on_cpu
@pytest.mark.parametrize("adapter_id", [*LORALIB_ADAPTERS, BF16_ADAPTER])
def test_greedy_completion_equals_the_reference(
    loralib_server: InferenceServer, merged_references: References, adapter_id: str
) -> None:
    with loralib_server.client() as client:
        response = client.post("/generate", json=generate_body(adapter_id, PROMPTS[1]))
    assert response.status_code == 200, response.text
    assert response.json() == merged_references.completion(adapter_id, chat(PROMPTS[1]), 48)
    assert response.json() != merged_references.completion(None, chat(PROMPTS[1]), 48)


@exact_only_on_cpu
def test_loralib_and_peft_adapters_batch_together(
    loralib_server: InferenceServer, merged_references: References
) -> None:
    requests = [
        (adapter_id, content)
        for adapter_id in [None, PEFT_ADAPTER, BF16_ADAPTER, *LORALIB_ADAPTERS]
        for content in PROMPTS
    ]
    engine = loralib_server.app.state.models[BASE_MODEL].engine

    async def send_all() -> list[dict]:
        async with loralib_server.async_client() as client:
            responses = await asyncio.gather(
                *(client.post("/generate", json=generate_body(a, content)) for a, content in requests)
            )
        return [response.json() for response in responses]

    with loralib_server.client() as client:  # loaded beforehand, so that every request joins the first batch
        for adapter_id in {adapter_id for adapter_id, _ in requests if adapter_id}:
            client.post("/generate", json=generate_body(adapter_id, PROMPTS[0], max_tokens=1))
    before = engine.stats()
    results = asyncio.run(send_all())
    after = engine.stats()

    for (adapter_id, content), result in zip(requests, results, strict=True):
        assert result == merged_references.completion(adapter_id, chat(content), 48), (adapter_id, content)
    rows = after["decoded_tokens"] - before["decoded_tokens"]
    assert rows / (after["decode_steps"] - before["decode_steps"]) > 3  # decoded together, not one by one


@pytest.mark.parametrize(
    ("adapter_id", "reason"),
    [(BIAS_ADAPTER, "trained biases"), (UNKNOWN_FORMAT_ADAPTER, "unsupported adapter format 'gguf'")],
)
def test_what_lora_cannot_express_is_refused(
    loralib_server: InferenceServer, adapter_id: str, reason: str
) -> None:
    with loralib_server.client() as client:
        response = client.post("/generate", json=generate_body(adapter_id, PROMPTS[0]))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter"
    assert reason in error["message"]
