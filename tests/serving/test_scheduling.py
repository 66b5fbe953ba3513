"""The engine's KV cache and scheduling: a pool written in place, admission by tokens, chunked prefill, one
host sync per forward pass, greedy completions equal to `generate` throughout."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from tests.serving.conftest import load_model
from tests.serving.test_engine import PROMPT, start_engine
from worker.serving.engine import (
    ContextLengthExceeded,
    Engine,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    TextDelta,
)
from worker.serving.kv_cache import BLOCK_TOKENS, RESERVED_BLOCKS, KvPool, bytes_per_token

CPU = torch.device("cpu")


class Completion:
    """One request's events, collected on the scheduler thread; `on_event` runs there too, before each."""

    def __init__(self, on_event=None) -> None:
        self.text = ""
        self.finished: Finished | Failed | None = None
        self._done = threading.Event()
        self._on_event = on_event

    def __call__(self, event: Event) -> None:
        if self._on_event:
            self._on_event(event)
        if isinstance(event, TextDelta):
            self.text += event.text
        else:
            self.finished = event
            self._done.set()

    def wait(self) -> Completion:
        assert self._done.wait(timeout=60)
        assert isinstance(self.finished, Finished), self.finished
        return self


def submit(engine: Engine, prompt: list[int], sink: Completion | None = None, **options) -> Completion:
    sink = sink or Completion()
    engine.submit(
        GenerationRequest(prompt_ids=prompt, **{"max_tokens": 16, "ignore_eos": True} | options), sink
    )
    return sink


def prompts(tokenizer: PreTrainedTokenizerBase, count: int, words: int = 3) -> list[list[int]]:
    """`count` different chat prompts."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question {index}: " + "descale the coffee machine " * words}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for index in range(count)
    ]


def generate(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase, prompt: list[int], tokens: int, **config
) -> str:
    """`generate`'s greedy completion of `prompt`, `tokens` long (ignoring end of sequence), as text."""
    model = load_model(model_dir)
    for name, value in config.items():
        setattr(model.config, name, value)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=GenerationConfig(
                max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            ),
        )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)


def test_the_kv_cache_is_allocated_once_and_written_in_place(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = start_engine(tiny_model_dir, tokenizer)
    storage = engine.kv_pool.storage
    before = (storage.data_ptr(), storage.shape)
    seen = set()
    decoding = threading.Event()

    def watch(event: Event) -> None:  # between two steps, on the scheduler thread
        seen.add((engine.kv_pool.storage.data_ptr(), engine.kv_pool.storage.shape))
        decoding.set()

    try:
        # Rows of different lengths leave at different steps; more join while the first ones decode.
        first = [
            submit(engine, prompt, Completion(watch), max_tokens=8 * (index + 1))
            for index, prompt in enumerate(prompts(tokenizer, 3))
        ]
        decoding.wait(timeout=30)
        later = [
            submit(engine, prompt, Completion(watch), max_tokens=12) for prompt in prompts(tokenizer, 2, 9)
        ]
        for completion in first + later:
            completion.wait()
    finally:
        engine.stop()
    assert seen == {before}
    assert engine.stats()["kv_cache_reserved_tokens"] == 0
    config = engine.model.config
    slots = engine.kv_pool.capacity + RESERVED_BLOCKS * BLOCK_TOKENS
    assert storage.nbytes == slots * bytes_per_token(config, storage.dtype)


def test_reserved_blocks_start_zeroed_and_go_back_to_the_pool(tiny_model_dir: Path) -> None:
    pool = KvPool(load_model(tiny_model_dir).config, tokens=4 * BLOCK_TOKENS, dtype=torch.float32, device=CPU)
    first = pool.reserve(2 * BLOCK_TOKENS + 1)  # three blocks
    assert len(first) == 3 and pool.reserved_tokens == 3 * BLOCK_TOKENS
    assert pool.reserve(2 * BLOCK_TOKENS) is None  # one block left
    pool.storage.fill_(float("nan"))  # what a sequence that went wrong may leave
    pool.release(first)
    again = pool.reserve(4 * BLOCK_TOKENS)
    slots = torch.tensor([block * BLOCK_TOKENS + offset for block in again for offset in range(BLOCK_TOKENS)])
    assert all(layer.index_select(0, slots).eq(0).all() for layer in pool.layers)


def test_admission_counts_tokens_and_outputs_stay_the_same(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    requests = prompts(tokenizer, 7, words=1)
    assert all(len(prompt) + 16 - 1 <= 2 * BLOCK_TOKENS for prompt in requests)  # two blocks each
    roomy = start_engine(tiny_model_dir, tokenizer)
    small = start_engine(tiny_model_dir, tokenizer, max_batch_tokens=6 * BLOCK_TOKENS)
    running = []
    try:
        expected = [completion.wait().text for completion in [submit(roomy, p) for p in requests]]
        watch = lambda event: running.append(small.stats()["running_sequences"])  # noqa: E731
        completions = [submit(small, prompt, Completion(watch)) for prompt in requests]
        assert [completion.wait().text for completion in completions] == expected
        assert [completion.finished.completion_tokens for completion in completions] == [16] * 7
    finally:
        roomy.stop()
        small.stop()
    assert max(running) == 3  # three requests' blocks fill the budget, whatever max_batch_size allows
    assert small.stats()["kv_cache_reserved_tokens"] == 0


def test_a_request_larger_than_the_budget_is_refused(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = Engine(load_model(tiny_model_dir), tokenizer, max_batch_tokens=100)
    assert engine.context_length == 96  # whole blocks of the budget
    with pytest.raises(ContextLengthExceeded, match="96 tokens") as too_many:
        engine.submit(GenerationRequest(prompt_ids=PROMPT, max_tokens=90), print)
    assert too_many.value.param == "max_tokens"


def test_chunked_prefill_gives_generates_output_and_decoding_goes_on_between_chunks(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    long_prompt = prompts(tokenizer, 1, words=30)[0]
    chunks = -(-len(long_prompt) // 16)
    assert chunks >= 8
    expected = generate(tiny_model_dir, tokenizer, long_prompt, 24)
    engine = start_engine(tiny_model_dir, tokenizer, prefill_chunk_tokens=16)
    try:
        assert submit(engine, long_prompt, max_tokens=24).wait().text == expected
        assert engine.stats()["prefills"] == chunks
        started = threading.Event()
        streaming = submit(engine, PROMPT, Completion(lambda event: started.set()), max_tokens=500)
        started.wait(timeout=30)
        steps = []
        submitted_at = engine.stats()["decode_steps"]
        long_one = submit(
            engine,
            long_prompt,
            Completion(lambda event: steps.append(engine.stats()["decode_steps"])),
            max_tokens=24,
        )
        assert long_one.wait().text == expected
        streaming.wait()
    finally:
        engine.stop()
    # The streaming row decoded with each chunk of the long prompt (whose first token came with the last).
    assert steps[0] - submitted_at >= chunks - 1


def test_a_sliding_window_masks_as_generate_does(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = prompts(tokenizer, 1, words=6)[0]
    expected = generate(tiny_model_dir, tokenizer, prompt, 24, sliding_window=16)
    model = load_model(tiny_model_dir)
    model.config.sliding_window = 16
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        text = submit(engine, prompt, max_tokens=24).wait().text
    finally:
        engine.stop()
    assert text == expected
    assert text != generate(tiny_model_dir, tokenizer, prompt, 24)  # the window made a difference


READS = ["tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]


def test_each_forward_pass_reads_the_device_once(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(load_model(tiny_model_dir), tokenizer, batch_window_seconds=0.05)
    reads: Counter[str] = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    engine.start()
    try:
        # Greedy and sampling rows, with and without top_p, in one batch.
        completions = [
            submit(
                engine,
                prompt,
                max_tokens=12,
                temperature=0.8 * (index % 3),
                top_p=0.9 if index % 2 else 1.0,
                seed=index,
            )
            for index, prompt in enumerate(prompts(tokenizer, 6))
        ]
        for completion in completions:
            completion.wait()
    finally:
        engine.stop()
        monkeypatch.undo()
    stats = engine.stats()
    assert stats["prefills"] == 1  # every prompt in one pass, which sampled their first tokens
    assert dict(reads) == {"tolist": stats["prefills"] + stats["decode_steps"]}
