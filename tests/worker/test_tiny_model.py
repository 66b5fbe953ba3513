from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Phi3ForCausalLM, PreTrainedTokenizerBase

from worker.tiny_model import END_OF_TEXT, END_OF_TURN, SPECIAL_TOKENS, make_tiny_model


def test_same_seed_writes_byte_identical_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again")
    names = sorted(path.name for path in tiny_model_dir.iterdir())
    assert "model.safetensors" in names
    assert names == sorted(path.name for path in again.iterdir())
    for name in names:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_another_seed_draws_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert (tiny_model_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_loads_as_a_phi3_with_fused_projections(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, Phi3ForCausalLM)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, torch.nn.Linear)
    assert isinstance(layer.mlp.gate_up_proj, torch.nn.Linear)
    assert model.config.vocab_size >= len(tokenizer)

    ids = tokenizer("Ahoy, matey!", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_generation_stops_at_end_of_turn_and_end_of_text(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stop_ids = set(model.generation_config.eos_token_id)
    assert stop_ids == set(tokenizer.convert_tokens_to_ids([END_OF_TEXT, END_OF_TURN]))
    assert tokenizer.eos_token == END_OF_TEXT


def test_special_tokens_are_single_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id != tokenizer.unk_token_id
        assert tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"][1] == token_id, token
        assert tokenizer.decode([token_id]) == token


def test_any_text_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Grüße, 船長! Tabs\tand\nnewlines, emoji 🏴‍☠️ and \x00 bytes."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_phi3_format(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Ahoy!"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nTalk like a pirate.<|end|>\n"
        "<|user|>\nHello<|end|>\n"
        "<|assistant|>\nAhoy!<|end|>\n<|endoftext|>"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nTalk like a pirate.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
