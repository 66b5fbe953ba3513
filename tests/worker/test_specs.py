"""The recipe's schemas: LoRA backend, QLoRA and checkpoint options, and the check against a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.specs import PeftConfig, TrainingConfig, check_against_model, fit_to_model
from tests.worker.conftest import Recorder, persona_inputs
from worker.recipe import train


@pytest.fixture(scope="module")
def phi3_config(tiny_model_dir: Path) -> dict:
    return json.loads((tiny_model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def gqa_config(phi3_config: dict) -> dict:
    """Phi-3 with grouped-query attention: 4 query heads share 2 key/value heads, as Phi-4-mini's do."""
    return {**phi3_config, "num_key_value_heads": 2}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"qkv_slices": ["q", "v"]}, "qkv_slices"),
        ({"backend": "loralib", "quantization": "4bit"}, "quantization"),
        ({"backend": "loralib", "use_rslora": True}, "use_rslora"),
        ({"backend": "loralib", "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"backend": "loralib", "target_modules": ["o_proj", "lm_head"]}, "target_modules"),
        ({"backend": "loralib", "target_modules": ["o_proj"], "qkv_slices": ["q"]}, "qkv_slices"),
        ({"backend": "loralib", "qkv_slices": ["q", "q"]}, "twice"),
        ({"backend": "loralib", "qkv_slices": []}, "qkv_slices"),
        ({"quantization": "2bit"}, "quantization"),
        # Nothing the trainer or the inference server cannot apply: embeddings, the output layer, full copies.
        ({"target_modules": ["qkv_proj", "lm_head"]}, "lm_head: embedding and output layers"),
        ({"target_modules": ["model.embed_tokens"]}, "embed_tokens"),
        ({"modules_to_save": ["lm_head"]}, "modules trained in full cannot be served"),
    ],
)
def test_peft_config_refuses_what_its_backend_cannot_train(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        PeftConfig(**fields)


@pytest.mark.parametrize(
    ("model", "field", "at_bound", "past_bound"),
    [
        (TrainingConfig, "max_steps", 1_000_000, 1_000_001),
        (TrainingConfig, "logging_steps", 1_000_000, 1_000_001),
        (TrainingConfig, "eval_steps", 1_000_000, 1_000_001),
        (TrainingConfig, "save_steps", 1_000_000, 1_000_001),
        (TrainingConfig, "save_total_limit", 100, 101),
        (TrainingConfig, "num_train_epochs", 100, 100.5),
        (TrainingConfig, "per_device_train_batch_size", 1024, 1025),
        (TrainingConfig, "gradient_accumulation_steps", 1024, 1025),
        (TrainingConfig, "learning_rate", 1.0, 1.01),
        (TrainingConfig, "weight_decay", 1.0, 1.01),
        (TrainingConfig, "max_grad_norm", 1000.0, 1000.5),
        (TrainingConfig, "max_seq_length", 131072, 131073),
        (TrainingConfig, "seed", 2**31 - 1, 2**31),
        (TrainingConfig, "output_dir", "d" * 4096, "d" * 4097),
        (PeftConfig, "r", 1024, 1025),
        (PeftConfig, "lora_alpha", 4096.0, 4096.5),
        (PeftConfig, "target_modules", ["o_proj"] * 64, ["o_proj"] * 65),
        (PeftConfig, "target_modules", ["x" * 200], ["x" * 201]),
    ],
)
def test_every_field_has_a_range_a_worker_can_run(model, field: str, at_bound, past_bound) -> None:
    model(**{field: at_bound})
    with pytest.raises(ValidationError, match=field):
        model(**{field: past_bound})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(
    ("model", "field"),
    [
        (TrainingConfig, "learning_rate"),
        (TrainingConfig, "weight_decay"),
        (TrainingConfig, "max_grad_norm"),
        (TrainingConfig, "num_train_epochs"),
        (TrainingConfig, "warmup_ratio"),
        (PeftConfig, "lora_alpha"),
        (PeftConfig, "lora_dropout"),
    ],
)
def test_no_number_is_infinite_or_nan(model, field: str, value: float) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        model(**{field: value})


def test_what_a_job_stores_the_worker_reads_back_unchanged() -> None:
    """Checkpoints are bounded by default, output_dir is dropped, and the stored dictionary (JSON) validates
    again to the same config in the worker."""
    config = TrainingConfig(save_steps=1, max_steps=1_000_000, output_dir="/tmp/x", save_total_limit=None)
    assert config.save_total_limit == 100 and config.output_dir is None
    assert TrainingConfig().save_total_limit == 100
    stored = json.loads(json.dumps(config.model_dump(mode="json")))
    assert TrainingConfig.model_validate(stored) == config
    peft = PeftConfig(target_modules=["o_proj", "self_attn.qkv_proj"], lora_alpha=4096)
    assert PeftConfig.model_validate(json.loads(json.dumps(peft.model_dump(mode="json")))) == peft
    with pytest.raises(ValidationError, match="use_reentrant"):
        TrainingConfig(gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    with pytest.raises(ValidationError, match="lone surrogate"):
        PeftConfig(target_modules=["o_proj\ud800"])


def test_loralib_options_resolve_to_layers() -> None:
    config = PeftConfig(backend="loralib", qkv_slices=["v", "q"])
    assert config.qkv_slices == ["q", "v"]  # in the order of the fused projection
    assert config.loralib_targets() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert PeftConfig(backend="loralib").enabled_qkv_slices() == ["q", "k", "v"]
    assert PeftConfig(quantization="8bit").quantization == "8bit"


def test_checkpoints_follow_evaluations_when_the_best_is_shipped() -> None:
    assert TrainingConfig().checkpoint_interval() is None
    assert TrainingConfig(save_steps=7).checkpoint_interval() == 7
    assert TrainingConfig(load_best_model_at_end=True, logging_steps=3).checkpoint_interval() == 3
    assert TrainingConfig(load_best_model_at_end=True, eval_steps=4).checkpoint_interval() == 4
    assert TrainingConfig(load_best_model_at_end=True, save_steps=6).checkpoint_interval() == 6


def test_loralib_cannot_split_a_grouped_query_qkv_proj(phi3_config: dict, gqa_config: dict) -> None:
    loralib = PeftConfig(backend="loralib", qkv_slices=["q", "v"])
    check_against_model(loralib, phi3_config)
    with pytest.raises(ValueError, match=r"^peft_config\.qkv_slices: .*grouped-query"):
        check_against_model(loralib, gqa_config)
    with pytest.raises(ValueError, match=r"^peft_config\.qkv_slices"):
        check_against_model(PeftConfig(backend="loralib"), gqa_config)  # all three slices by default
    # Without qkv_proj, or with PEFT's single LoRA over the fused projection, nothing needs splitting.
    check_against_model(PeftConfig(backend="loralib", target_modules=["o_proj", "down_proj"]), gqa_config)
    check_against_model(PeftConfig(), gqa_config)


def test_target_modules_are_checked_against_the_model_type(phi3_config: dict) -> None:
    check_against_model(PeftConfig(target_modules=["self_attn.qkv_proj", "down_proj"]), phi3_config)
    with pytest.raises(ValueError, match=r"^peft_config\.target_modules: .*q_proj, v_proj"):
        check_against_model(PeftConfig(target_modules=["q_proj", "v_proj"]), phi3_config)
    llama = {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8}
    check_against_model(PeftConfig(target_modules=["q_proj", "v_proj"]), llama)  # unknown type: not checked
    with pytest.raises(ValueError, match=r"^peft_config\.backend: .*'llama'"):
        check_against_model(PeftConfig(backend="loralib"), llama)


def test_max_seq_length_is_capped_by_the_model_context(phi3_config: dict) -> None:
    context = phi3_config["max_position_embeddings"]
    short = {**phi3_config, "max_position_embeddings": 1024}
    assert fit_to_model(TrainingConfig(), PeftConfig(), short).max_seq_length == 1024  # the default, capped
    assert fit_to_model(TrainingConfig(max_seq_length=512), PeftConfig(), short).max_seq_length == 512
    assert fit_to_model(TrainingConfig(), PeftConfig(), phi3_config).max_seq_length == min(2048, context)
    with pytest.raises(ValueError, match=r"^training_config\.max_seq_length: 4096 is longer than .* 1024"):
        fit_to_model(TrainingConfig(max_seq_length=4096), PeftConfig(), short)


def test_the_worker_refuses_a_grouped_query_model_before_loading_it(gqa_config: dict, tmp_path: Path) -> None:
    model_dir = tmp_path / "gqa"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(gqa_config))  # no weights: it must stop before them
    inputs = persona_inputs(
        model_dir,
        training_config=TrainingConfig(max_steps=1),
        peft_config=PeftConfig(backend="loralib"),
        output_dir=tmp_path / "attempt",
    )
    with pytest.raises(ValueError, match=r"^peft_config\.qkv_slices"):
        train(inputs, Recorder())


def test_load_best_model_at_end_needs_a_validation_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=TrainingConfig(load_best_model_at_end=True),
        peft_config=PeftConfig(),
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="load_best_model_at_end needs a validation_file"):
        train(inputs, Recorder())
