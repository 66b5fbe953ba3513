"""The scheduler on its own: limits, failures and shutdown."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from tests.serving.conftest import load_model
from worker.serving.engine import ContextLengthExceeded, Engine, Event, Failed, Finished, GenerationRequest

PROMPT = [2, 203, 815, 263, 269, 4, 203, 3, 203]


def start_engine(model_dir: Path, tokenizer: PreTrainedTokenizerBase, **options) -> Engine:
    engine = Engine(load_model(model_dir), tokenizer, **options)
    engine.start()
    return engine


def submit(engine: Engine, prompt: list[int], **options) -> queue.SimpleQueue[Event]:
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    engine.submit(GenerationRequest(prompt_ids=prompt, **{"max_tokens": 16} | options), events.put)
    return events


def last_event(events: queue.SimpleQueue[Event]) -> Event:
    while not isinstance(event := events.get(timeout=30), Finished | Failed):
        pass
    return event


def test_no_more_rows_than_max_batch_size_decode_together(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = start_engine(tiny_model_dir, tokenizer, max_batch_size=2)
    try:
        streams = [submit(engine, PROMPT, ignore_eos=True) for _ in range(5)]
        assert [last_event(events).completion_tokens for events in streams] == [16] * 5
        stats = engine.stats()
        assert 1 < stats["decoded_tokens"] / stats["decode_steps"] <= 2
    finally:
        engine.stop()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = start_engine(tiny_model_dir, tokenizer)
    try:
        failed = last_event(submit(engine, [10**6]))  # no such token: the embedding lookup raises
        assert isinstance(failed, Failed)
        assert "generation failed" in failed.message
        assert isinstance(last_event(submit(engine, PROMPT)), Finished)
    finally:
        engine.stop()


def test_requests_must_fit_the_context(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = Engine(load_model(tiny_model_dir), tokenizer)
    with pytest.raises(ContextLengthExceeded) as too_long:
        engine.submit(GenerationRequest(prompt_ids=[3] * 2048, max_tokens=1), print)
    assert too_long.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as too_many:
        engine.submit(GenerationRequest(prompt_ids=[3] * 2000, max_tokens=49), print)
    assert too_many.value.param == "max_tokens"
    engine.submit(GenerationRequest(prompt_ids=[3] * 2000, max_tokens=48), print)  # fits exactly


def test_stopping_fails_what_still_runs(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = start_engine(tiny_model_dir, tokenizer)
    events = submit(engine, PROMPT, ignore_eos=True, max_tokens=2000)
    engine.stop()
    assert isinstance(last_event(events), Failed)
    with pytest.raises(RuntimeError):
        submit(engine, PROMPT)
