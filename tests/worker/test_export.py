"""Merged-model export on the tiny Phi-3: a PEFT and a loralib adapter folded into the base by
worker.export load with `AutoModelForCausalLM.from_pretrained` and generate what base + adapter generates,
token for token; the directory is sharded safetensors in the base's dtype with the tokenizer and its chat
template."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.worker.conftest import fresh_base, logits
from worker.adapter_archive import LORALIB_DIR
from worker.export import merge, pack
from worker.loralib_backend import LoralibConfig, add_lora_layers, save_adapter
from worker.tiny_model import make_random_adapter

SHARD = "100KB"  # the tiny model's ~1 MB of weights: several shards
LORALIB_CONFIG = LoralibConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    bias="none",
    target_modules=["qkv_proj", "o_proj", "down_proj"],
    qkv_slices=["q", "v"],
)


def random_loralib_adapter(model_dir: Path, adapter_dir: Path) -> Path:
    """A loralib adapter with non-zero weights (B starts at zero), saved as training saves one."""
    model = fresh_base(model_dir)
    add_lora_layers(model, LORALIB_CONFIG)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    save_adapter(model, adapter_dir, LORALIB_CONFIG, str(model_dir))
    return adapter_dir / LORALIB_DIR


def with_loralib(model_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """Base + the loralib adapter, unmerged: as the adapter computes at training time."""
    from safetensors.torch import load_file

    model = fresh_base(model_dir)
    add_lora_layers(model, LORALIB_CONFIG)
    model.load_state_dict(load_file(adapter_dir / "lora_state_dict.safetensors"), strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("peft"), seed=5)


@pytest.fixture(scope="module")
def loralib_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_loralib_adapter(tiny_model_dir, tmp_path_factory.mktemp("loralib"))


def greedy(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0].tolist()


@pytest.mark.parametrize("fmt", ["peft", "loralib"])
def test_merged_model_generates_as_base_plus_adapter(
    fmt, tiny_model_dir, peft_adapter, loralib_adapter, persona_ids, tmp_path
) -> None:
    if fmt == "peft":
        adapter = peft_adapter
        reference = PeftModel.from_pretrained(fresh_base(tiny_model_dir), str(adapter)).eval()
    else:
        adapter = loralib_adapter
        reference = with_loralib(tiny_model_dir, adapter)
    merged_dir = merge(str(tiny_model_dir), adapter, fmt, tmp_path / "merged", max_shard_size=SHARD)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()

    base_out = logits(fresh_base(tiny_model_dir), persona_ids)
    adapted = logits(reference, persona_ids)
    assert (adapted - base_out).abs().max() > 0.1  # the adapter changes the model: the test can tell
    torch.testing.assert_close(logits(merged, persona_ids), adapted, atol=1e-4, rtol=1e-4)
    assert greedy(merged, persona_ids) == greedy(reference, persona_ids)


def test_merged_directory_is_sharded_safetensors_with_the_tokenizer(
    tiny_model_dir, peft_adapter, tmp_path
) -> None:
    merged_dir = merge(str(tiny_model_dir), peft_adapter, "peft", tmp_path / "merged", max_shard_size=SHARD)
    shards = sorted(merged_dir.glob("model-*.safetensors"))
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert not [path for path in merged_dir.iterdir() if path.suffix in {".bin", ".pt", ".pth"}]
    assert not (merged_dir / "adapter_config.json").exists()
    for shard in shards:
        with safe_open(shard, "pt") as tensors:
            assert {tensors.get_tensor(name).dtype for name in tensors.keys()}  # noqa: SIM118 (not a dict) == {torch.float32}
    names = set(index["weight_map"])
    assert not [name for name in names if "lora" in name]
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == base.chat_template and tokenizer.chat_template
    messages = [{"role": "user", "content": "Ahoy?"}]
    assert tokenizer.apply_chat_template(messages) == base.apply_chat_template(messages)


def test_bf16_base_merges_in_bf16(tiny_model_dir, peft_adapter, tmp_path) -> None:
    """The merged model keeps the dtype its base was stored in (a QLoRA adapter too: it is merged into
    the unquantised base)."""
    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_dir)
    merged_dir = merge(str(bf16_dir), peft_adapter, "peft", tmp_path / "merged", max_shard_size=SHARD)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto")
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.bfloat16}


def test_pack_is_a_plain_tar_of_the_directory(tiny_model_dir, peft_adapter, tmp_path) -> None:
    import hashlib

    merged_dir = merge(str(tiny_model_dir), peft_adapter, "peft", tmp_path / "merged", max_shard_size=SHARD)
    archive = tmp_path / "merged.tar"
    sha256 = pack(merged_dir, archive)
    assert sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    with tarfile.open(archive, "r:") as tar:  # "r:": refuses a compressed archive
        assert sorted(tar.getnames()) == sorted(path.name for path in merged_dir.iterdir())
