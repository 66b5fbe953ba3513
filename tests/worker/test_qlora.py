"""QLoRA on CPU: LoRA trains over a bitsandbytes-quantised tiny Phi-3, then serves over the fp32 base."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import PERSONA_FILE, Recorder, fresh_base, persona_inputs
from worker.data import load_tokenized_dataset
from worker.recipe import train

TRAINING_CONFIG = TrainingConfig(
    learning_rate=2e-2, max_steps=10, per_device_train_batch_size=8, warmup_ratio=0, logging_steps=2, seed=7
)


def persona_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
    """Mean loss over the trained tokens of the first eight persona conversations."""
    data = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=2048).dataset.select(range(8))
    losses = []
    with torch.no_grad():
        for ids, mask in zip(data["input_ids"], data["completion_mask"], strict=True):
            labels = [token if trained else -100 for token, trained in zip(ids, mask, strict=True)]
            losses.append(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_trains_an_adapter_for_the_unquantised_base(
    quantization: str, tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=TRAINING_CONFIG,
        peft_config=PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0, quantization=quantization),
        output_dir=tmp_path,
    )
    recorder = Recorder()
    run = train(inputs, recorder)

    qkv_proj = run.trainer.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer
    if quantization == "4bit":
        assert isinstance(qkv_proj, bnb.nn.Linear4bit)
        assert qkv_proj.weight.quant_state.quant_type == "nf4"
        assert qkv_proj.weight.quant_state.nested  # double quantisation
        assert qkv_proj.compute_dtype == torch.bfloat16
    else:
        assert isinstance(qkv_proj, bnb.nn.Linear8bitLt)
    assert recorder.events[-1]["train_loss"] < recorder.events[0]["train_loss"] - 1.0
    assert run.result.formats == ["peft"]
    device_event = next(text for _, text, _ in recorder.messages if text.startswith("Device "))
    expected = "4bit (NF4, computing in bfloat16)" if quantization == "4bit" else "8bit (LLM.int8)"
    assert device_event.endswith(f", linear layers in {expected}")

    base = fresh_base(tiny_model_dir)
    base_loss = persona_loss(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, run.result.adapter_dir).eval()
    assert not any("bnb" in type(module).__module__ for module in adapted.modules())
    assert persona_loss(adapted, tokenizer) < base_loss - 1.0
