"""Incremental decoding never splits a character; stop strings are cut, and held back while undecided."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from worker.serving.text import CompletionText, IncrementalDecoder, StopStringFilter

TEXT = "Ahoy 日本 ü, matey!"


def test_pieces_never_split_a_character_and_join_to_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # multi-byte characters take several byte tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == TEXT == tokenizer.decode(ids)


def test_an_unfinished_character_is_flushed_as_a_replacement_character(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = tokenizer.encode("日")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(token) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == tokenizer.decode(ids[:-1]) == "\ufffd"


def test_special_tokens_give_no_text(tokenizer: PreTrainedTokenizerBase) -> None:
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push(tokenizer.convert_tokens_to_ids("<|assistant|>")) == ""
    assert "".join(decoder.push(token) for token in tokenizer.encode("Hi")) == "Hi"


@pytest.mark.parametrize(
    ("pieces", "stop", "emitted", "stopped"),
    [
        (["Hello wor", "ld!"], ["world"], ["Hello ", ""], True),  # "wor" waits: it may begin "world"
        (["Hello wo", "rm"], ["world"], ["Hello ", "worm"], False),  # released once it cannot match
        (["abc", "def"], ["cd"], ["ab", ""], True),  # a stop string across two pieces
        (["one. Two"], [".", "Two"], ["one"], True),  # the first stop string to appear wins
        (["xx", "END", "more"], ["END"], ["xx", "", ""], True),  # nothing after the stop string
    ],
)
def test_stop_strings(pieces: list[str], stop: list[str], emitted: list[str], stopped: bool) -> None:
    stops = StopStringFilter(stop)
    assert [stops.push(piece) for piece in pieces] == emitted
    assert stops.stopped == stopped


def test_held_back_text_is_released_when_generation_ends() -> None:
    stops = StopStringFilter(["STOP"])
    assert stops.push("the end ST") == "the end "
    assert stops.flush() == "ST"
    assert not stops.stopped


def test_a_stop_string_of_multibyte_characters_is_matched_whole(tokenizer: PreTrainedTokenizerBase) -> None:
    text = CompletionText(tokenizer, stop=["日本"])
    ids = tokenizer.encode(TEXT)
    emitted = "".join(text.push(token) for token in ids[:-1]) + text.finish()
    assert emitted == "Ahoy "
    assert text.stopped
