"""Heavy requests never stall light ones: while four clients send 1 MB prompts through a real `phitune api`
to a real `phitune inference` process, one-line chats keep answering within a second.

Tokenising a 1 MB prompt takes about a second of CPU; on the inference server's event loop, four of them held
every other request for seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phitune.launch import free_port, run_phitune, running
from tests.serving.conftest import BASE_MODEL, INFERENCE_TOKEN, SERVING_TOKEN

HEAVY_CLIENTS = 4
HEAVY_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 25_000)[:1_000_000]
LIGHT_LATENCY_SECONDS = 1.0


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    """`phitune api` and `phitune inference` processes: the API's URL and a tenant's Authorization header."""
    api_port, inference_port = free_port(), free_port()
    inference_url = f"http://127.0.0.1:{inference_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
        "HF_HUB_OFFLINE": "1",
        "PHITUNE_DATA_DIR": str(tmp_path_factory.mktemp("fair-sharing")),
        "PHITUNE_BASE_MODELS": json.dumps({BASE_MODEL: str(tiny_model_dir)}),
        "PHITUNE_BROKER_URL": "memory://",
        "PHITUNE_API_URL": f"http://127.0.0.1:{api_port}",
        "PHITUNE_INFERENCE_URL": inference_url,
        "PHITUNE_WORKER_TOKEN": "fair-sharing-worker-token",
        "PHITUNE_SERVING_TOKEN": SERVING_TOKEN,
        "PHITUNE_INFERENCE_TOKEN": INFERENCE_TOKEN,
        "PHITUNE_INFERENCE_TORCH_THREADS": "1",
    }
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "fair", env=env).strip().splitlines()[-1]
    with (
        running(["inference", "--port", str(inference_port)], inference_url, env=env),
        running(["api", "--port", str(api_port)], f"http://127.0.0.1:{api_port}", env=env),
    ):
        yield f"http://127.0.0.1:{api_port}", {"Authorization": f"Bearer {key}"}


def chat(content: str) -> dict:
    return {"model": BASE_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


async def heavy_and_light(url: str, auth: dict) -> tuple[list[httpx.Response], list[tuple[float, int]]]:
    """Four 1 MB prompts at once and, until they are all answered, one-line chats one after another: the
    heavy responses and each light chat's (latency, status)."""
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=120) as client:
        assert (await client.post("/v1/chat/completions", json=chat("Hi"))).status_code == 200  # warm
        heavy = [
            asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(HEAVY_PROMPT)))
            for _ in range(HEAVY_CLIENTS)
        ]
        await asyncio.sleep(0.3)  # the heavy bodies are sent and being tokenised
        light: list[tuple[float, int]] = []
        while not all(request.done() for request in heavy):
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=chat("Hi"))
            light.append((time.perf_counter() - started, response.status_code))
        return [request.result() for request in heavy], light


def test_one_line_chats_answer_within_a_second_while_four_1mb_prompts_are_served(
    api: tuple[str, dict],
) -> None:
    url, auth = api
    heavy, light = asyncio.run(heavy_and_light(url, auth))
    for response in heavy:  # accepted by the API (4 MiB body cap), tokenised, refused for the tiny context
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
    assert light, "no one-line chat ran while the heavy prompts were served"
    assert all(status == 200 for _, status in light)
    slowest = max(latency for latency, _ in light)
    assert slowest < LIGHT_LATENCY_SECONDS, f"a one-line chat took {slowest:.2f} s: {light}"
