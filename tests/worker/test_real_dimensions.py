"""Phi-3-mini at full width on the CPU: 2 layers of the real dimensions (3072 hidden, 8192 intermediate, 32
heads, 32064 tokens) with the real vocabulary and random weights. One training step with each LoRA backend and
one served request catch the shape and dtype bugs a 64-wide model hides."""

from __future__ import annotations

import gc
import queue
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GenerationConfig

from app.specs import PeftConfig, TrainingConfig
from tests.real_phi3 import write_random_phi3
from tests.worker.conftest import Recorder, persona_inputs
from worker.model_loader import load_base_model
from worker.recipe import train
from worker.serving.engine import Engine, Finished, GenerationRequest, TextDelta
from worker.serving.lora import read_adapter

HIDDEN, QKV, GATE_UP = 3072, 3 * 3072, 2 * 8192
ONE_STEP = TrainingConfig(
    max_steps=1, per_device_train_batch_size=2, max_seq_length=256, learning_rate=1e-3, warmup_ratio=0
)


@pytest.fixture(scope="module")
def real_phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_phi3(tmp_path_factory.mktemp("models") / "phi3-2-layers", layers=2)


def train_one_step(model_dir: Path, output_dir: Path, peft_config: PeftConfig) -> tuple[Path, Recorder]:
    recorder = Recorder()
    inputs = persona_inputs(
        model_dir, training_config=ONE_STEP, peft_config=peft_config, output_dir=output_dir, device="cpu"
    )
    run = train(inputs, recorder)
    adapter_dir = run.result.adapter_dir
    del run
    gc.collect()
    return adapter_dir, recorder


@pytest.fixture(scope="module")
def peft_adapter(real_phi3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    adapter_dir, recorder = train_one_step(
        real_phi3_dir, tmp_path_factory.mktemp("peft"), PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0)
    )
    assert recorder.events and recorder.events[-1]["step"] == 1
    return adapter_dir


def test_peft_trains_one_step_at_full_width(peft_adapter: Path) -> None:
    weights = load_file(peft_adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1"
    shapes = {
        "self_attn.qkv_proj": (HIDDEN, QKV),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_up_proj": (HIDDEN, GATE_UP),
        "mlp.down_proj": (8192, HIDDEN),
    }
    for layer, (fan_in, fan_out) in shapes.items():
        assert weights[f"{prefix}.{layer}.lora_A.weight"].shape == (8, fan_in)
        b = weights[f"{prefix}.{layer}.lora_B.weight"]
        assert b.shape == (fan_out, 8) and b.dtype == torch.float32
        assert b.abs().sum() > 0  # B starts at zero: one step moved it


def test_loralib_trains_one_step_at_full_width(real_phi3_dir: Path, tmp_path: Path) -> None:
    config = PeftConfig(backend="loralib", qkv_slices=["q", "v"], r=8, lora_alpha=16, lora_dropout=0.0)
    adapter_dir, recorder = train_one_step(real_phi3_dir, tmp_path, config)
    weights = load_file(adapter_dir / "loralib" / "lora_state_dict.safetensors")
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert weights[f"{qkv}.lora_A"].shape == (2 * 8, HIDDEN)  # one rank-8 A per enabled slice, stacked
    assert weights[f"{qkv}.lora_B"].shape == (2 * HIDDEN, 8)  # the q and v slices' B
    assert weights[f"{qkv}.lora_B"].abs().sum() > 0
    assert recorder.events[-1]["step"] == 1


def test_one_request_is_served_at_full_width_as_peft_generates(
    real_phi3_dir: Path, peft_adapter: Path
) -> None:
    model, tokenizer = load_base_model(str(real_phi3_dir), for_training=False, device="cpu")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where is the serial number?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    engine = Engine(model, tokenizer, max_batch_tokens=1024)  # a 4 GiB default pool is not needed here
    engine.start()
    try:
        slot = engine.install_adapter(
            read_adapter(peft_adapter, engine.lora.linear_shapes, model.device)
        ).result(timeout=120)
        events: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(
            GenerationRequest(
                prompt_ids=prompt, max_tokens=8, temperature=0, adapter_slot=slot, ignore_eos=True
            ),
            events.put,
        )
        pieces = []
        while not isinstance(event := events.get(timeout=300), Finished):
            assert isinstance(event, TextDelta), event
            pieces.append(event.text)
    finally:
        engine.stop()
    served = "".join(pieces)
    del engine, model
    gc.collect()

    base, _ = load_base_model(str(real_phi3_dir), for_training=False, device="cpu")
    reference = PeftModel.from_pretrained(base, peft_adapter).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # No end-of-sequence ids: exactly 8 tokens, as the server's ignore_eos.
        config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        output = reference.generate(ids, generation_config=config)
    assert served == tokenizer.decode(output[0, len(prompt) :])
