"""Inference benchmark: the tiny Phi-3 on CPU through the public API and the inference server, real HTTP.

    single_stream_ratio  tokens/s of one streamed request ÷ tokens/s of in-process `PeftModel.generate`
                         with the same adapter, prompt and number of tokens (target >= 0.85)
    batching_speedup     tokens/s of 8 concurrent requests ÷ the same 8 one at a time (target >= 2.5)
    multi_adapter_ratio  tokens/s of 8 concurrent requests on 8 adapters ÷ 8 on one adapter (target >= 0.8)
    cold_adapter_ms      the added latency of the first request to an adapter not loaded yet

Every request generates exactly `max_tokens` tokens (`ignore_eos`; the baseline runs without end-of-sequence
ids), so that all throughputs compare like with like. Each ratio is the median of ROUNDS pairs measured back
to back, so load from other processes on the machine hits both sides of a pair; the JSON line also gives
each ratio's range over the rounds. `measure_http` takes a base URL and a `Caller`, so the same measurements
can run against the inference server directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from phitune.launch import free_port, run_phitune, running
from worker.adapter_archive import pack
from worker.tiny_model import make_random_adapter, make_tiny_model

BASE_MODEL = "tiny-phi3"
MESSAGES = [{"role": "user", "content": "How do I descale the coffee machine?"}]
MAX_TOKENS = 128
CONCURRENCY = 8
ROUNDS = 5
COLD_ADAPTERS = 5
WORKER_TOKEN = "bench-worker-token"

# (client, adapter id or None for the base model, stream?) -> completion tokens received
Caller = Callable[[httpx.AsyncClient, str | None, bool], Awaitable[int]]


async def measure_http(
    base_url: str,
    call: Caller,
    adapters: list[str],
    cold_adapters: list[str],
    short_call: Caller,
    baseline: Callable[[], float],
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """The four figures over HTTP. Each ratio is the median over ROUNDS of a pair measured back to back
    (numerator right after denominator), so a load that comes and goes on the machine hits both sides.
    `baseline()` measures in-process tokens/s; `adapters` are warmed up first; `cold_adapters` must not be
    loaded yet. Adapters are whatever `call` understands (fine-tuned model ids through the API)."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600) as client:
        for adapter in adapters:
            await short_call(client, adapter, False)

        async def rate(adapter_ids: list[str], *, stream: bool, concurrent: bool) -> float:
            start = time.perf_counter()
            if concurrent:
                tokens = sum(await asyncio.gather(*(call(client, a, stream) for a in adapter_ids)))
            else:
                tokens = sum([await call(client, a, stream) for a in adapter_ids])
            return tokens / (time.perf_counter() - start)

        one_adapter = [adapters[0]] * CONCURRENCY
        single, batching, multi = [], [], []
        for _ in range(ROUNDS):
            in_process = baseline()
            single.append(await rate([adapters[0]], stream=True, concurrent=False) / in_process)
            sequential = await rate(one_adapter, stream=False, concurrent=False)
            concurrent_one = await rate(one_adapter, stream=False, concurrent=True)
            batching.append(concurrent_one / sequential)
            multi.append(await rate(adapters[:CONCURRENCY], stream=False, concurrent=True) / concurrent_one)

        async def latency(adapter: str) -> float:
            start = time.perf_counter()
            await short_call(client, adapter, False)
            return time.perf_counter() - start

        # Each cold request is paired with the same request once the adapter is loaded: the difference is
        # the added latency.
        added = []
        for adapter in cold_adapters:
            cold = await latency(adapter)
            added.append(cold - await latency(adapter))
    return {
        "single_stream_ratio": statistics.median(single),
        "batching_speedup": statistics.median(batching),
        "multi_adapter_ratio": statistics.median(multi),
        "cold_adapter_ms": statistics.median(added) * 1000,
        "single_stream_ratio_range": [min(single), max(single)],
        "batching_speedup_range": [min(batching), max(batching)],
        "multi_adapter_ratio_range": [min(multi), max(multi)],
    }


def in_process_generate(
    base_model_dir: Path, adapter_dir: Path, max_tokens: int = MAX_TOKENS
) -> Callable[[], float]:
    """A function measuring tokens/s of one greedy `PeftModel.generate` of `max_tokens` tokens here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model_dir), adapter_dir
    ).eval()
    ids = torch.tensor(
        [tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)]
    )
    # No end-of-sequence ids: exactly max_tokens tokens, as the server's ignore_eos.
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.set_num_threads(1)  # as the server's engine on CPU (see worker.serving.settings)

    def measure() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        return (output.shape[1] - ids.shape[1]) / (time.perf_counter() - start)

    measure()  # warm-up
    return measure


def chat_caller(max_tokens: int = MAX_TOKENS) -> Caller:
    """Calls the public POST /v1/chat/completions with a model id, always generating `max_tokens` tokens."""

    async def call(client: httpx.AsyncClient, model: str | None, stream: bool) -> int:
        body = {
            "model": model or BASE_MODEL,
            "messages": MESSAGES,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
            "ignore_eos": True,
        }
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]
        body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage": {' in line:
                    return json.loads(line[6:])["usage"]["completion_tokens"]
        raise RuntimeError("the stream ended without usage")

    return call


def phitune_env(data_dir: Path, base_model_dir: Path, *, api_url: str, inference_url: str) -> dict[str, str]:
    return os.environ | {
        "HF_HUB_OFFLINE": "1",
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_BASE_MODELS": json.dumps({BASE_MODEL: str(base_model_dir)}),
        "PHITUNE_API_URL": api_url,
        "PHITUNE_INFERENCE_URL": inference_url,
        "PHITUNE_BROKER_URL": "memory://",  # no training here: job messages go nowhere
        "PHITUNE_WORKER_TOKEN": WORKER_TOKEN,
        "PHITUNE_MAX_LOADED_ADAPTERS": "32",
        "PHITUNE_RATE_LIMIT_PER_MINUTE": "0",  # every round's requests on one key
    }


def register_fine_tuned_models(api_url: str, key: str, archives: dict[str, Path]) -> dict[str, str]:
    """Make each archive a succeeded job's adapter through the API, as a worker would; adapter → model id."""
    models = {}
    with httpx.Client(base_url=api_url, timeout=60) as client:
        user = {"Authorization": f"Bearer {key}"}
        dataset = json.dumps({"messages": [*MESSAGES, {"role": "assistant", "content": "Arr."}]}).encode()
        file_id = client.post(
            "/v1/files", files={"file": ("bench.jsonl", dataset)}, data={"purpose": "fine-tune"}, headers=user
        ).json()["id"]
        for name, archive in archives.items():
            job_id = client.post(
                "/v1/fine_tuning/jobs", json={"model": BASE_MODEL, "training_file": file_id}, headers=user
            ).json()["id"]
            claim = client.post(
                f"/internal/v1/jobs/{job_id}/claim", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}
            ).json()
            attempt = {"Authorization": f"Bearer {claim['token']}"}
            client.put(f"/internal/v1/jobs/{job_id}/adapter", content=archive.read_bytes(), headers=attempt)
            client.post(f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt)
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=user).json()
            models[name] = job["fine_tuned_model"]
    return models


def random_adapter_archives(base_model_dir: Path, root: Path, count: int) -> dict[str, Path]:
    """`count` random adapters of the base model, packed as a worker uploads them: name → archive."""
    names = [f"adapter{index}" for index in range(count)]
    return {
        name: pack(make_random_adapter(base_model_dir, root / name, seed=index), root / f"{name}.tar.gz")
        for index, name in enumerate(names)
    }


@contextmanager
def serving(
    root: Path, base_model_dir: Path, archives: dict[str, Path], env: dict[str, str] | None = None
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """`phitune api` + `phitune inference` on the tiny model, data in `root`, `env` over `phitune_env`, each
    archive registered as a fine-tuned model: yields the API's URL, a tenant's key and adapter → model id."""
    api_url, inference_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    full_env = phitune_env(root / "data", base_model_dir, api_url=api_url, inference_url=inference_url)
    full_env |= env or {}
    run_phitune("migrate", env=full_env)
    key = run_phitune("keys", "create", "--tenant", "bench", env=full_env).strip().splitlines()[-1]
    api_port, inference_port = api_url.rsplit(":", 1)[1], inference_url.rsplit(":", 1)[1]
    with (
        running(["api", "--port", api_port], api_url, env=full_env),
        running(["inference", "--port", inference_port], inference_url, env=full_env),
    ):
        yield api_url, key, register_fine_tuned_models(api_url, key, archives)


def run() -> dict[str, object]:
    """The whole benchmark, set up from scratch in a temporary directory: in-process `generate` as the
    baseline, then the same requests through the public API (API process → inference server process)."""
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as scratch:
        root = Path(scratch)
        base_model_dir = make_tiny_model(root / "model")
        archives = random_adapter_archives(base_model_dir, root, CONCURRENCY + COLD_ADAPTERS)
        names = list(archives)
        baseline = in_process_generate(base_model_dir, root / names[0])
        with serving(root, base_model_dir, archives) as (api_url, key, models):
            measured = asyncio.run(
                measure_http(
                    api_url,
                    chat_caller(),
                    adapters=[models[name] for name in names[:CONCURRENCY]],
                    cold_adapters=[models[name] for name in names[CONCURRENCY:]],
                    short_call=chat_caller(max_tokens=8),
                    baseline=baseline,
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
    return {
        **{name: _rounded(value) for name, value in measured.items()},
        "max_tokens": MAX_TOKENS,
        "concurrency": CONCURRENCY,
        "rounds": ROUNDS,
        "path": "client -> API process -> inference server process",
    }


def _rounded(value: float | list[float]) -> float | list[float]:
    return [round(v, 3) for v in value] if isinstance(value, list) else round(value, 3)
