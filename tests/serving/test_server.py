"""The inference server over real HTTP: completions equal `PeftModel.generate`, batched across adapters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from tests.serving.conftest import (
    ADAPTERS,
    BASE_MODEL,
    PICKLED_ADAPTER,
    InferenceServer,
    References,
    exact_only_on_cpu,
    generate_body,
    read_stream,
)

SHORT = "Hello!"
LONG = "How do I update the firmware, and what does the warranty cover? Please clean the filter. " * 3


@pytest.mark.parametrize("adapter_id", [None, "ftjob-plain"])
def test_greedy_completion_equals_peft_generate(
    server: InferenceServer, references: References, adapter_id: str | None
) -> None:
    with server.client() as client:
        response = client.post("/generate", json=generate_body(adapter_id, LONG, max_tokens=64))
    assert response.status_code == 200, response.text
    assert response.json() == references.completion(adapter_id, [{"role": "user", "content": LONG}], 64)


@exact_only_on_cpu
def test_mixed_adapter_batch_equals_separate_runs(server: InferenceServer, references: References) -> None:
    requests = [
        (adapter_id, content)
        for adapter_id in [None, *ADAPTERS]
        for content in (SHORT, LONG, "Is the refund within thirty days?")
    ]
    engine = server.app.state.models[BASE_MODEL].engine
    before = engine.stats()

    async def send_all() -> list[dict]:
        async with server.async_client() as client:
            responses = await asyncio.gather(
                *(client.post("/generate", json=generate_body(a, content)) for a, content in requests)
            )
        return [response.json() for response in responses]

    for adapter_id in ADAPTERS:  # loaded beforehand, so that every request joins the first batch
        httpx.post(
            f"{server.url}/generate",
            json=generate_body(adapter_id, SHORT, max_tokens=1),
            headers=server.headers,
        )
    results = asyncio.run(send_all())

    for (adapter_id, content), result in zip(requests, results, strict=True):
        expected = references.completion(adapter_id, [{"role": "user", "content": content}], 48)
        assert result == expected, (adapter_id, content)
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_tokens"] - before["decoded_tokens"]
    assert rows / steps > 3  # the requests decoded together (one at a time would make it 1)


def test_stream_deltas_concatenate_to_the_completion(server: InferenceServer) -> None:
    body = generate_body("ftjob-attention", LONG, max_tokens=64, temperature=0.9, seed=3)
    with server.client() as client:
        completion = client.post("/generate", json=body).json()
        with client.stream("POST", "/generate", json=body | {"stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            deltas, final = read_stream(response)
    assert len(deltas) > 1
    assert "".join(deltas) == completion["text"]
    assert final == {key: completion[key] for key in ("finish_reason", "prompt_tokens", "completion_tokens")}


def test_stop_strings_end_the_completion_and_are_not_returned(server: InferenceServer) -> None:
    body = generate_body("ftjob-plain", SHORT, max_tokens=40, ignore_eos=True)
    with server.client() as client:
        full = client.post("/generate", json=body).json()["text"]
        assert len(full) > 12
        stop = full[8:11]
        cut = full.index(stop)
        stopped = client.post("/generate", json=body | {"stop": [stop, "never appears"]}).json()
        with client.stream("POST", "/generate", json=body | {"stop": stop, "stream": True}) as response:
            deltas, final = read_stream(response)
        unmatched = client.post("/generate", json=body | {"stop": ["never appears"]}).json()
    assert stopped["text"] == full[:cut]
    assert stopped["finish_reason"] == "stop"
    assert "".join(deltas) == full[:cut]
    assert final["finish_reason"] == "stop"
    assert unmatched["text"] == full
    assert unmatched["finish_reason"] == "length"


def test_a_seed_makes_sampling_reproducible_even_in_a_batch(server: InferenceServer) -> None:
    body = generate_body("ftjob-patterns", SHORT, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)

    async def batched() -> str:
        async with server.async_client() as client:
            others = [body | {"seed": seed, "adapter_id": None} for seed in (1, 2)]
            responses = await asyncio.gather(*(client.post("/generate", json=b) for b in [body, *others]))
        return responses[0].json()["text"]

    with server.client() as client:
        alone = client.post("/generate", json=body).json()["text"]
        again = client.post("/generate", json=body).json()["text"]
        other_seed = client.post("/generate", json=body | {"seed": 43}).json()["text"]
    assert alone == again == asyncio.run(batched())
    assert other_seed != alone


def test_a_disconnected_stream_frees_its_row(server: InferenceServer) -> None:
    engine = server.app.state.models[BASE_MODEL].engine
    cancelled = engine.stats()["cancelled_sequences"]
    # Thousands of tokens: seconds of work unless the disconnect cancels it.
    body = generate_body("ftjob-plain", SHORT, max_tokens=2000, ignore_eos=True, stream=True)
    with server.client() as client, client.stream("POST", "/generate", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.stats()["running_sequences"] == 1
    deadline = time.monotonic() + 2
    while server.stats()["running_sequences"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats()["running_sequences"] == 0
    assert engine.stats()["cancelled_sequences"] == cancelled + 1


def test_eviction_then_reload_gives_the_same_output(
    start_server: Callable[[int], InferenceServer], references: References
) -> None:
    small = start_server(2)
    first, second, third = ADAPTERS
    with small.client() as client:

        def complete(adapter_id: str) -> dict:
            return client.post("/generate", json=generate_body(adapter_id, LONG)).json()

        before_eviction = complete(first)
        complete(second)
        complete(third)
        assert small.stats()["loaded_adapters"] == [second, third]
        assert small.stats()["max_loaded_adapters"] == 2
        assert complete(first) == before_eviction
        assert small.stats()["loaded_adapters"] == [third, first]
    assert before_eviction == references.completion(first, [{"role": "user", "content": LONG}], 48)


def test_delete_evicts_an_adapter(server: InferenceServer) -> None:
    with server.client() as client:
        client.post("/generate", json=generate_body("ftjob-plain", SHORT, max_tokens=1))
        assert "ftjob-plain" in server.stats()["loaded_adapters"]
        assert client.delete("/adapters/ftjob-plain").json() == {"id": "ftjob-plain", "evicted": True}
        assert "ftjob-plain" not in server.stats()["loaded_adapters"]
        assert client.delete("/adapters/ftjob-plain").json()["evicted"] is False


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.keys() >= {"message", "type", "param", "code"}
    return error


def test_a_prompt_longer_than_the_context_is_refused(server: InferenceServer) -> None:
    with server.client() as client:
        response = client.post("/generate", json=generate_body(None, "water tank " * 1200))
    error = error_of(response, 400)
    assert (error["code"], error["param"], error["type"]) == (
        "context_length_exceeded",
        "messages",
        "invalid_request_error",
    )


def test_max_tokens_beyond_the_context_is_refused(server: InferenceServer) -> None:
    with server.client() as client:
        response = client.post("/generate", json=generate_body(None, SHORT, max_tokens=2048))
    error = error_of(response, 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert "2048" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (generate_body(None, SHORT) | {"base_model": "phi-9"}, 404, "model_not_found"),
        (generate_body("ftjob-unknown", SHORT), 404, "model_not_found"),
        (generate_body("../../etc", SHORT), 404, "model_not_found"),
        (generate_body(PICKLED_ADAPTER, SHORT), 422, "invalid_adapter"),
        (generate_body(None, SHORT, stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
        (generate_body(None, SHORT, top_p=0), 400, "invalid_value"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(
    server: InferenceServer, body: dict, status: int, code: str
) -> None:
    with server.client() as client:
        error = error_of(client.post("/generate", json=body), status)
    assert error["code"] == code


def test_health(server: InferenceServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
