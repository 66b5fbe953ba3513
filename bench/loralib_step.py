"""loralib training-step benchmark: loralib's own `MergedLinear` on qkv_proj against `LowRankMergedLinear`.

A randomly initialised Phi-3-architecture model (LAYERS layers, HIDDEN wide, fp32 on this machine's CPU)
gets the loralib backend's layers for the default PeftConfig (backend "loralib": all four projections, all
three qkv slices, r=16, dropout 0.05). A step is forward, backward and an AdamW step on the LoRA weights,
on BATCH sequences of TOKENS tokens. Each of ROUNDS rounds times one step with loralib's forward on
qkv_proj and one with the low-rank forward, in alternating order; the two are the same layers (same
parameters and optimizer state), only their class is switched. It reports:

    loralib_ms, low_rank_ms          median ms per step (and their ranges)
    speedup                          the median over rounds of loralib's step time ÷ the low-rank one's
    loralib_gflops, low_rank_gflops  per step (forward and backward), from FlopCounterMode, and their ratio
"""

from __future__ import annotations

import os
import statistics
import time

import loralib as lora
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Phi3Config, Phi3ForCausalLM

from app.specs import PeftConfig
from worker.loralib_backend import LoralibConfig, prepare_for_training
from worker.loralib_layers import LowRankMergedLinear

LAYERS = 2
HIDDEN = 1024
TOKENS = 1024
BATCH = 1
VOCAB = 1024  # small, so that the LM head does not dwarf the layers
ROUNDS = 8  # of one step with each
VARIANTS = {"loralib": lora.MergedLinear, "low_rank": LowRankMergedLinear}
PEFT_CONFIG = PeftConfig(backend="loralib")  # the defaults: all four projections, q, k and v, r=16


def make_model() -> torch.nn.Module:
    """The Phi-3 layout at HIDDEN wide (Phi-3-mini's 8/3 MLP ratio, 64-wide heads), with loralib's layers."""
    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 8 // 3 // 64 * 64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // 64,
        num_key_value_heads=HIDDEN // 64,
        max_position_embeddings=TOKENS,
        original_max_position_embeddings=TOKENS,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    prepare_for_training(model, LoralibConfig.from_peft_config(PEFT_CONFIG))
    for name, parameter in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(parameter, std=0.02)  # as after some training; loralib starts B at zero
    return model.train()


def use(model: torch.nn.Module, layer_class: type) -> None:
    """Switch every qkv_proj to `layer_class`: both hold the same parameters, only the forward differs."""
    for module in model.modules():
        if isinstance(module, lora.MergedLinear):
            module.__class__ = layer_class


def run() -> dict[str, object]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = {}
    for name, layer_class in VARIANTS.items():
        use(model, layer_class)
        step()  # warm-up, and AdamW's state exists before the counted and timed steps
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(ROUNDS):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:  # alternating, so that drift in the machine's load falls on both alike
            use(model, VARIANTS[name])
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1000)

    # Each round's two steps ran back to back, under the same load from other processes: their ratio is
    # steadier on a shared machine than the ratio of the two medians.
    ratios = [slow / fast for slow, fast in zip(times["loralib"], times["low_rank"], strict=True)]
    return {
        "loralib_ms": round(statistics.median(times["loralib"]), 1),
        "low_rank_ms": round(statistics.median(times["low_rank"]), 1),
        "speedup": round(statistics.median(ratios), 3),
        "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "loralib_gflops": round(flops["loralib"] / 1e9, 1),
        "low_rank_gflops": round(flops["low_rank"] / 1e9, 1),
        "flops_ratio": round(flops["loralib"] / flops["low_rank"], 3),
        "loralib_ms_range": [round(min(times["loralib"]), 1), round(max(times["loralib"]), 1)],
        "low_rank_ms_range": [round(min(times["low_rank"]), 1), round(max(times["low_rank"]), 1)],
        "model": {"layers": LAYERS, "hidden": HIDDEN, "tokens": TOKENS, "batch": BATCH, "r": PEFT_CONFIG.r},
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        "device": "cpu, fp32",
    }
