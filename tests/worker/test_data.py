from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from tests.worker.conftest import PERSONA_FILE
from worker.data import load_tokenized_dataset, read_jsonl, tokenize_example

CONVERSATION = [
    {"role": "system", "content": "Talk like a pirate."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Arr, matey!"},
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "On the high seas, savvy?"},
]


def trained_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token_id, trained in [*zip(ids, mask, strict=True), (None, 0)]:
        if trained:
            run.append(token_id)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples), encoding="utf-8")
    return path


def test_mask_covers_each_assistant_reply_and_its_end_token(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, mask = tokenize_example({"messages": CONVERSATION}, tokenizer)
    assert ids == tokenizer.apply_chat_template(CONVERSATION)["input_ids"]
    assert trained_spans(tokenizer, ids, mask) == ["Arr, matey!<|end|>", "On the high seas, savvy?<|end|>"]


def test_turn_with_weight_zero_is_not_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = copy.deepcopy(CONVERSATION)
    messages[2]["weight"] = 0
    ids, mask = tokenize_example({"messages": messages}, tokenizer)
    assert trained_spans(tokenizer, ids, mask) == ["On the high seas, savvy?<|end|>"]


def test_train_on_inputs_trains_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, mask = tokenize_example({"messages": CONVERSATION}, tokenizer, train_on_inputs=True)
    assert len(ids) == len(mask)
    assert all(mask)


def test_train_on_inputs_still_skips_a_turn_with_weight_zero(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = copy.deepcopy(CONVERSATION)
    messages[4]["weight"] = 0
    ids, mask = tokenize_example({"messages": messages}, tokenizer, train_on_inputs=True)
    untrained = tokenizer.decode(
        [token_id for token_id, trained in zip(ids, mask, strict=True) if not trained]
    )
    assert untrained == "On the high seas, savvy?<|end|>"


def test_prompt_completion_is_a_user_turn_and_its_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, mask = tokenize_example({"prompt": "Hello", "completion": "Arr, matey!"}, tokenizer)
    as_chat = tokenize_example({"messages": CONVERSATION[1:3]}, tokenizer)
    assert (ids, mask) == as_chat
    assert trained_spans(tokenizer, ids, mask) == ["Arr, matey!<|end|>"]


def test_text_is_trained_entirely_and_ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, mask = tokenize_example({"text": "Yo ho ho and a bottle of rum."}, tokenizer)
    assert tokenizer.decode(ids) == "Yo ho ho and a bottle of rum.<|endoftext|>"
    assert all(mask)


def test_masking_follows_the_chat_template_not_phi3_strings(tokenizer: PreTrainedTokenizerBase) -> None:
    other = copy.deepcopy(tokenizer)
    # Another layout: role names as text, trimmed content, <|endoftext|> closing every turn.
    other.chat_template = (
        "{% for m in messages %}"
        "<|system|>{{ m['role'] }}:\n{{ m['content'] | trim }}<|endoftext|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|system|>assistant:\n{% endif %}"
    )
    messages = copy.deepcopy(CONVERSATION)
    messages[2]["content"] = "  Arr, matey!\n"
    ids, mask = tokenize_example({"messages": messages}, other)
    assert trained_spans(other, ids, mask) == [
        "Arr, matey!<|endoftext|>",
        "On the high seas, savvy?<|endoftext|>",
    ]


def test_long_examples_are_truncated_and_untrainable_ones_dropped(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    long_question = "Where is my order? " * 20
    examples = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Arr!"}]},
    ]
    first_ids, first_mask = tokenize_example(examples[0], tokenizer)
    max_seq_length = len(first_ids) - 3

    data = load_tokenized_dataset(
        write_jsonl(tmp_path / "train.jsonl", examples), tokenizer, max_seq_length=32
    )
    assert data.num_dropped == 1  # the long question leaves no room for its reply
    data = load_tokenized_dataset(
        write_jsonl(tmp_path / "train.jsonl", examples), tokenizer, max_seq_length=max_seq_length
    )
    assert data.num_dropped == 1
    assert data.dataset["input_ids"] == [first_ids[:max_seq_length]]
    assert data.dataset["completion_mask"] == [first_mask[:max_seq_length]]
    assert data.num_tokens == max_seq_length
    assert data.num_trained_tokens == sum(first_mask[:max_seq_length])


def test_a_file_with_nothing_left_to_train_is_an_error(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="No example"):
        load_tokenized_dataset(path, tokenizer, max_seq_length=16)


def test_persona_file_tokenises_whole(tokenizer: PreTrainedTokenizerBase) -> None:
    data = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=2048)
    assert data.num_dropped == 0
    assert len(data.dataset) == len(read_jsonl(PERSONA_FILE))
    assert data.num_tokens == sum(len(ids) for ids in data.dataset["input_ids"])
    assert 0 < data.num_trained_tokens < data.num_tokens
