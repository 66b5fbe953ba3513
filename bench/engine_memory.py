"""Engine memory benchmark: the KV cache of Phi-3-mini at 32 rows × 4096 tokens, computed for the former
design and for the pool, then the engine's memory measured on a reduced-depth Phi-3 serving 32 requests.

Computed for Phi-3-mini (32 layers, 32 KV heads of 96 dims, bf16: 384 KiB of keys and values per token):

    old_cache_gib  the former DynamicCache of 32 rows × 4096 tokens (it was sized by rows × longest row)
    old_peak_gib   twice that: a row joining or leaving rebuilt every layer's cache before freeing the old one
    pool_gib       the pool for a budget of 32 × 4096 tokens (PHITUNE_INFERENCE_MAX_BATCH_TOKENS=131072),
                   allocated once
    gather_gib     the most the engine adds to it: one layer's keys and values gathered for attention, all
                   32 rows at 4096 tokens
    peak_gib       pool_gib + gather_gib

Measured on the CPU with a Phi-3 of 2 layers at the real width (3072, 32 KV heads) in bf16, random weights
from `Phi3Config` (nothing is downloaded), the same 32 × 4096 budget: the pool's bytes against the formula,
the resident memory the engine added when made (the pool is zeroed, so it is resident), and the peak
resident memory added while serving REQUESTS requests of PROMPT_TOKENS + MAX_TOKENS tokens at once (the
kernel's high-water mark, reset before serving), next to the computed gather of one layer at that load.
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from tests.phi3_tokenizer import FIXTURES as PHI3_FIXTURES
from worker.serving.engine import Engine, Event, Finished, GenerationRequest
from worker.serving.kv_cache import BLOCK_TOKENS, RESERVED_BLOCKS, bytes_per_token
from worker.tiny_model import build_tokenizer

PHI3_MINI = Phi3Config.from_json_file(str(PHI3_FIXTURES / "config.json"))  # the Hub's config.json
ROWS, CONTEXT = 32, PHI3_MINI.max_position_embeddings
MEASURED_LAYERS = 2
REQUESTS, PROMPT_TOKENS, MAX_TOKENS = 32, 512, 16
GIB, MIB = 2**30, 2**20


def computed() -> dict[str, float]:
    """Phi-3-mini's KV cache at ROWS × CONTEXT, in GiB, for the former design and for the pool."""
    per_token = bytes_per_token(PHI3_MINI, torch.bfloat16)
    full = ROWS * CONTEXT * per_token
    gather = full // PHI3_MINI.num_hidden_layers
    pool = (ROWS * CONTEXT + RESERVED_BLOCKS * BLOCK_TOKENS) * per_token
    return {
        "kv_bytes_per_token": per_token,
        "old_cache_gib": full / GIB,
        "old_peak_gib": 2 * full / GIB,
        "pool_gib": pool / GIB,
        "gather_gib": gather / GIB,
        "peak_gib": (pool + gather) / GIB,
    }


def measured() -> dict[str, float]:
    """The engine of a MEASURED_LAYERS-deep Phi-3 at full width, serving REQUESTS requests at once."""
    tokenizer = build_tokenizer()
    sized_for_tokenizer = {
        "num_hidden_layers": MEASURED_LAYERS,
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Phi3Config(**PHI3_MINI.to_dict() | sized_for_tokenizer)
    model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    before_engine = _resident("VmRSS")
    engine = Engine(model, tokenizer, max_batch_size=REQUESTS, max_batch_tokens=ROWS * CONTEXT)
    added_by_engine = _resident("VmRSS") - before_engine
    per_token = bytes_per_token(config, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, len(tokenizer), (REQUESTS, PROMPT_TOKENS), generator=generator).tolist()
    done = threading.Semaphore(0)
    finished = []

    def on_event(event: Event) -> None:
        if isinstance(event, Finished):
            finished.append(event)
            done.release()

    _reset_peak()
    baseline = _resident("VmRSS")
    start = time.perf_counter()
    engine.start()
    for prompt in prompts:
        engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True), on_event)
    for _ in prompts:
        done.acquire()
    seconds = time.perf_counter() - start
    peak_added = _resident("VmHWM") - baseline
    engine.stop()
    longest = PROMPT_TOKENS + MAX_TOKENS - 1
    return {
        "layers": MEASURED_LAYERS,
        "budget_tokens": ROWS * CONTEXT,
        "pool_mib_computed": (ROWS * CONTEXT + RESERVED_BLOCKS * BLOCK_TOKENS) * per_token / MIB,
        "pool_mib_allocated": engine.kv_pool.storage.nbytes / MIB,
        "resident_mib_added_by_engine": added_by_engine / MIB,
        "requests": REQUESTS,
        "prompt_tokens": PROMPT_TOKENS,
        "max_tokens": MAX_TOKENS,
        "completion_tokens": sum(event.completion_tokens for event in finished),
        "gather_mib_computed": REQUESTS * longest * per_token / MEASURED_LAYERS / MIB,
        "peak_resident_mib_added_while_serving": peak_added / MIB,
        "old_peak_mib_computed": 2 * REQUESTS * longest * per_token / MIB,
        "serving_seconds": seconds,
    }


def run() -> dict[str, object]:
    return {
        "phi3_mini_32x4096": _rounded(computed()),
        "measured_cpu_bf16_width_3072": _rounded(measured()),
    }


def _resident(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS: now; VmHWM: the peak), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> None:
    """Reset the kernel's high-water mark of resident memory (VmHWM) to the current VmRSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) if isinstance(value, float) else value for name, value in figures.items()}


if __name__ == "__main__":
    import json

    print(json.dumps(run()))
