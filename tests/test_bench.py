"""The training benchmark (`python -m bench train`): its pieces, and a smoke run of its quick mode.

The smoke run takes every step of the real benchmark (model, data, both sides in processes of their own,
scoring, FLOPs) on a tiny model; its figures mean nothing, so only their presence and sanity are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.train import (
    QUICK,
    assistant_tokens,
    matmul_parameters,
    synthetic_conversations,
    training_flops,
)
from phitune.launch import REPO

SIDE_FIGURES = {"tokens_per_s", "wall_s", "peak_rss_mb", "eval_loss", "mfu"}


def test_the_data_is_deterministic_and_skewed() -> None:
    conversations = synthetic_conversations(200, seed=1, max_reply_words=450)
    assert conversations == synthetic_conversations(200, seed=1, max_reply_words=450)
    assert conversations != synthetic_conversations(200, seed=2, max_reply_words=450)
    words = sorted(len(messages[-1]["content"].split()) for messages in conversations)
    assert all(messages[-1]["role"] == "assistant" for messages in conversations)
    assert words[len(words) // 2] < 50 and words[-1] > 300  # most replies short, a long tail


def test_the_scored_tokens_are_those_the_worker_trains(tokenizer) -> None:
    """The scorer's tokens and mask are the worker's (`worker.data`) for the same conversation, so eval_loss
    covers exactly the tokens phitune's side trains on."""
    from worker.data import tokenize_conversation

    for messages in synthetic_conversations(20, seed=3, max_reply_words=60):
        ids, scored = assistant_tokens(tokenizer, messages, max_length=10**6)
        worker_ids, worker_mask = tokenize_conversation(messages, tokenizer)
        assert (ids, scored) == (worker_ids, [bool(bit) for bit in worker_mask])


def test_the_flops_formula_counts_the_models_weights() -> None:
    """matmul_parameters agrees with the model and with PEFT's LoRA on the benchmark's config."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    from bench.reference_recipe import PEFT_CONFIG

    config = Phi3Config(
        vocab_size=128,
        hidden_size=QUICK.hidden,
        intermediate_size=QUICK.intermediate,
        num_hidden_layers=QUICK.layers,
        num_attention_heads=QUICK.heads,
        num_key_value_heads=QUICK.heads,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = Phi3ForCausalLM(config)
    linear = sum(
        module.weight.numel()
        for name, module in model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    lora = get_peft_model(model, LoraConfig(**PEFT_CONFIG))
    trained = sum(parameter.numel() for parameter in lora.parameters() if parameter.requires_grad)
    assert matmul_parameters(QUICK) == (linear, trained)
    frozen, adapters = matmul_parameters(QUICK)
    plain = training_flops(
        QUICK, vocab=128, tokens=10, loss_tokens=4, sum_squared_lengths=100, recompute=False
    )
    assert plain == 4 * frozen * 10 + 6 * adapters * 10 + 4 * 128 * QUICK.hidden * 4 + 12 * QUICK.hidden * 100
    recomputed = training_flops(
        QUICK, vocab=128, tokens=10, loss_tokens=4, sum_squared_lengths=100, recompute=True
    )
    assert recomputed > plain


@pytest.mark.e2e
def test_the_training_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    env = os.environ | {"PHITUNE_BENCH_QUICK": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "train"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line; the sides' logs go to stderr
    result = json.loads(lines[0])
    assert result["quick"] is True and result["speedup"] > 0
    assert math.isfinite(result["eval_loss_ratio"]) and result["peak_matmul_gflops"] > 0
    for side in ("ours", "reference"):
        figures = result[side]
        assert set(figures) >= SIDE_FIGURES, figures
        assert figures["tokens_per_s"] > 0 and figures["wall_s"] > 0 and figures["peak_rss_mb"] > 0
        assert math.isfinite(figures["eval_loss"]) and figures["eval_loss"] > 0
        assert 0 <= figures["mfu"] < 1
        if result["device"] == "cpu":
            assert figures["precision"] == "fp32" and figures["recompute"] is False
    # The same data: both sides trained the same tokens.
    assert result["ours"]["tokens"] == result["reference"]["tokens"]


GPU_CHECK_SIDE_FIGURES = {
    "tokens_per_s", "tokens_per_s_with_warmup", "mfu", "peak_gpu_mb", "peak_rss_mb", "train_s", "steps",
    "tokens",
}  # fmt: skip


@pytest.mark.e2e
def test_the_gpu_checks_speed_section_rehearses_on_the_cpu(tmp_path: Path) -> None:
    """`bench.gpu_check --tiny`'s speed section: a narrow 2-layer Phi-3, one length, LoRA, 3 steps a side
    (the first 2 the warm-up), each side in its own process."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    options = ["--tiny", "--only", "speed", "--lengths", "64", "--modes", "lora", "--speed-steps", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *options], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line; the processes' output goes to stderr
    result = json.loads(lines[0])
    assert result["ok"] is True and result["skipped"] == {} and result["peak"]["tflops"] > 0
    pair = result["speed"]["lora@64"]
    assert pair["speedup"] > 0 and pair["speedup_with_warmup"] > 0
    for side in ("ours", "reference"):
        figures = pair[side]
        assert set(figures) >= GPU_CHECK_SIDE_FIGURES, figures
        assert figures["tokens_per_s"] > 0 and figures["tokens_per_s_with_warmup"] > 0
        assert 0 < figures["mfu"] < 1
        assert figures["steps"] == 3 and figures["timed_steps"] == 1
        assert figures["peak_gpu_mb"] is None  # trained on the CPU
    assert pair["ours"]["tokens"] == pair["reference"]["tokens"]  # the same data


def test_the_vllm_check_plans_the_engines_it_compares_and_says_what_it_misses(tmp_path: Path) -> None:
    """`bench.vllm_check` needs vLLM on a GPU: here its plan, and an honest refusal to run."""
    command = [sys.executable, "-m", "bench.vllm_check", "--dir", str(tmp_path)]
    dry = subprocess.run([*command, "--dry-run"], cwd=REPO, capture_output=True, text=True, check=True)
    plan = json.loads(dry.stdout)["plan"]
    vllm, api = plan["vllm"], plan["api"]
    assert vllm["command"][1:3] == ["serve", str(tmp_path / "model")] and "--enable-lora" in vllm["command"]
    assert vllm["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert api["env"]["PHITUNE_INFERENCE_ENGINE"] == "vllm"
    assert api["env"]["PHITUNE_INFERENCE_URL"].endswith(f":{vllm['port']}")
    assert api["env"]["PHITUNE_INFERENCE_TOKEN"] == vllm["command"][vllm["command"].index("--api-key") + 1]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    if importlib.util.find_spec("vllm") is None:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 1 and "vllm" in json.loads(done.stdout)["missing"]
