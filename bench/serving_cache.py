"""The LRU cliff: aggregate tokens/s as the adapters in flight outgrow `PHITUNE_MAX_LOADED_ADAPTERS`.

The tiny Phi-3 on CPU through the real processes (client → `phitune api` → `phitune inference`, see
`bench.inference`), the server keeping CACHE adapters loaded. STREAMS concurrent clients each send
REQUESTS_PER_STREAM requests one after another, every request generating exactly MAX_TOKENS tokens
(`ignore_eos`); each request's adapter is drawn from a working set of 1, 4, CACHE and 2 × CACHE distinct
adapters, with uniform or skewed (Zipf, s = 1) popularity; before each measurement, one short untimed
request to each of the first CACHE of them loads the most popular ones. The figure at each point is the
aggregate completion tokens/s, the median over ROUNDS.

    ratio_2x_cache_vs_in_cache  tokens/s with 2 × CACHE adapters ÷ with CACHE adapters, the same popularity,
                                measured back to back (target >= 0.5): the median over ROUNDS of the
                                pairs, with its range

The draws are seeded, so every round sends the same sequence of requests. `BENCH_SERVING_CACHE_QUICK=1`: one
round of fewer, shorter requests (a smoke test, not a measurement).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.inference import chat_caller, random_adapter_archives, serving
from worker.tiny_model import make_tiny_model

QUICK = os.environ.get("BENCH_SERVING_CACHE_QUICK", "") not in ("", "0")
CACHE = 4
STREAMS = 8
MAX_TOKENS = 16 if QUICK else 64
REQUESTS_PER_STREAM = 2 if QUICK else 8
ROUNDS = 1 if QUICK else 5
WORKING_SETS = sorted({1, 4, CACHE, 2 * CACHE})
POPULARITIES = ("uniform", "skewed")


def draws(adapters: list[str], popularity: str, seed: int) -> list[list[str]]:
    """Each stream's sequence of adapters: uniform over `adapters`, or Zipf-like (weight 1 / rank)."""
    weights = [1.0 if popularity == "uniform" else 1 / (rank + 1) for rank in range(len(adapters))]
    rng = random.Random(seed)
    return [rng.choices(adapters, weights, k=REQUESTS_PER_STREAM) for _ in range(STREAMS)]


async def measure(base_url: str, headers: dict[str, str], adapters: list[str]) -> dict[str, object]:
    call, short_call = chat_caller(max_tokens=MAX_TOKENS), chat_caller(max_tokens=1)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600) as client:

        async def stream(sequence: list[str]) -> int:
            return sum([await call(client, adapter, False) for adapter in sequence])

        async def rate(size: int, popularity: str) -> float:
            for adapter in adapters[: min(size, CACHE)]:  # the most popular ones start loaded (untimed)
                await short_call(client, adapter, False)
            plan = draws(adapters[:size], popularity, seed=size)
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(stream(sequence) for sequence in plan)))
            return tokens / (time.perf_counter() - start)

        curve: dict[str, dict[int, list[float]]] = {
            p: {size: [] for size in WORKING_SETS} for p in POPULARITIES
        }
        for _ in range(ROUNDS):
            for popularity in POPULARITIES:
                for size in WORKING_SETS:  # ascending: 2 x CACHE right after CACHE
                    curve[popularity][size].append(await rate(size, popularity))
        ratios = {
            p: [out / within for within, out in zip(curve[p][CACHE], curve[p][2 * CACHE], strict=True)]
            for p in POPULARITIES
        }
    return {
        "tokens_per_s": {
            p: {str(size): round(statistics.median(rates)) for size, rates in curve[p].items()}
            for p in POPULARITIES
        },
        "ratio_2x_cache_vs_in_cache": {p: round(statistics.median(ratios[p]), 3) for p in POPULARITIES},
        "ratio_2x_cache_vs_in_cache_range": {
            p: [round(min(ratios[p]), 3), round(max(ratios[p]), 3)] for p in POPULARITIES
        },
    }


def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as scratch:
        root = Path(scratch)
        base_model_dir = make_tiny_model(root / "model")
        archives = random_adapter_archives(base_model_dir, root, 2 * CACHE)
        env = {"PHITUNE_MAX_LOADED_ADAPTERS": str(CACHE)}
        with serving(root, base_model_dir, archives, env) as (api_url, key, models):
            measured = asyncio.run(
                measure(api_url, {"Authorization": f"Bearer {key}"}, list(models.values()))
            )
    return {
        **measured,
        "max_loaded_adapters": CACHE,
        "host_adapter_cache_mb": os.environ.get("PHITUNE_INFERENCE_HOST_ADAPTER_CACHE_MB", "default"),
        "streams": STREAMS,
        "requests_per_stream": REQUESTS_PER_STREAM,
        "max_tokens": MAX_TOKENS,
        "rounds": ROUNDS,
        "quick": QUICK,
        "path": "client -> API process -> inference server process",
    }
