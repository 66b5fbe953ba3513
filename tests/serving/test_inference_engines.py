"""The API's engine interface (`app.inference.InferenceEngine`): one contract, checked against `phitune
inference` (a real server over HTTP, completions equal to PEFT's) and against the vLLM stand-in
(`tests.vllm_stub`; the API-level vLLM path is in tests/api/test_vllm_engine.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.errors import APIError
from app.inference import InferenceEngine, StreamFailed
from app.inference.phitune import PhituneEngine
from app.inference.vllm import VllmEngine
from app.inference_contract import GenerateBody, GenerateFinish, GenerateResult
from app.storage.local import LocalStorage
from tests.serving.conftest import BASE_MODEL, INFERENCE_TOKEN, InferenceServer, References, generate_body
from tests.serving.stub_store import serve_in_thread
from tests.vllm_stub import VllmStub, vllm_stub_app


async def complete_and_stream(engine: InferenceEngine, body: dict) -> tuple[GenerateResult, list]:
    generation = GenerateBody.model_validate(body)
    result = await engine.complete(generation)
    stream = await engine.open_stream(generation.model_copy(update={"stream": True}))
    try:
        return result, [item async for item in stream]
    finally:
        await stream.aclose()


def assert_contract(result: GenerateResult, items: list) -> None:
    """A stream is text pieces then one finish, and says what the whole completion says."""
    *texts, finish = items
    assert all(isinstance(text, str) for text in texts) and isinstance(finish, GenerateFinish)
    assert "".join(texts) == result.text
    assert GenerateFinish.model_validate(result.model_dump()) == finish


def test_the_phitune_engine_keeps_the_contract_and_equals_peft(
    server: InferenceServer, references: References
) -> None:
    async def run() -> tuple[GenerateResult, list]:
        async with server.async_client() as client:
            return await complete_and_stream(PhituneEngine(client), generate_body("ftjob-plain", "Hi there"))

    result, items = asyncio.run(run())
    assert_contract(result, items)
    messages = [{"role": "user", "content": "Hi there"}]
    assert result.model_dump() == references.completion("ftjob-plain", messages, 48)


def test_the_phitune_engine_refuses_before_streaming_and_unloads(server: InferenceServer, tmp_path) -> None:
    async def too_long() -> None:
        async with server.async_client() as client:
            await PhituneEngine(client).open_stream(
                GenerateBody.model_validate(generate_body(None, "x", max_tokens=10**5))
            )

    with pytest.raises(APIError) as refused:
        asyncio.run(too_long())
    assert (refused.value.status_code, refused.value.code) == (400, "context_length_exceeded")
    settings = Settings(data_dir=tmp_path, inference_url=server.url, inference_token=INFERENCE_TOKEN)
    assert "ftjob-plain" in server.stats()["loaded_adapters"]
    PhituneEngine.unload(settings, "ftjob-plain")
    assert "ftjob-plain" not in server.stats()["loaded_adapters"]


@pytest.fixture(scope="module")
def vllm_url() -> Iterator[str]:
    with serve_in_thread(vllm_stub_app(VllmStub(base_model=BASE_MODEL, api_key=INFERENCE_TOKEN))) as url:
        yield url


def test_the_vllm_engine_keeps_the_contract(vllm_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, inference_engine="vllm", inference_url=vllm_url)

    async def run() -> tuple[GenerateResult, list]:
        client = httpx.AsyncClient(base_url=vllm_url, headers={"Authorization": f"Bearer {INFERENCE_TOKEN}"})
        async with client:
            engine = VllmEngine(settings, client, LocalStorage(tmp_path / "storage"))
            return await complete_and_stream(engine, generate_body(None, "Hi there"))

    result, items = asyncio.run(run())
    assert_contract(result, items)
    assert result.text == f"{BASE_MODEL} says Hi there"
    assert not any(isinstance(item, StreamFailed) for item in items)
