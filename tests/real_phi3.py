"""Phi-3-mini with random weights: the Hub's config (optionally fewer layers, or a narrow stand-in for CPU
checks of the GPU script) and the real vocabulary, written offline like a model directory of the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from tests.phi3_tokenizer import write_phi3_model_configs, write_phi3_tokenizer

# A narrow Phi-3 that keeps the real vocabulary and context: the GPU check's CPU rehearsal.
NARROW = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}


def write_random_phi3(
    directory: Path,
    *,
    layers: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    **overrides: int,
) -> Path:
    """A Phi-3-mini-4k-instruct directory (config, generation config, tokenizer, safetensors) whose weights
    are drawn from `seed`, with `layers` layers and the config fields in `overrides` changed."""
    directory = Path(directory)
    write_phi3_tokenizer(directory)
    write_phi3_model_configs(directory)
    config_path = directory / "config.json"
    fields = json.loads(config_path.read_text(encoding="utf-8"))
    fields.update(num_hidden_layers=layers, **overrides)
    fields.pop("auto_map", None)  # the Hub's remote code is not needed: transformers has Phi-3
    config = Phi3Config(**{key: value for key, value in fields.items() if not key.startswith("_")})
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # drawn in `dtype` directly: a 3.8B model drawn in fp32 first needs 15 GB
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.update(**json.loads((directory / "generation_config.json").read_text()))
    model.save_pretrained(directory)
    return directory
