"""Turns a training file into token ids and a loss mask, the way Phi-3 is fine-tuned.

The API has already validated the file: JSON lines all of one format, chat (`{"messages": [...]}`, an
assistant message may carry `"weight": 0|1`), prompt/completion (`{"prompt", "completion"}`, a user turn
answered by an assistant turn) or plain text (`{"text"}`, trained on entirely).

By default the loss covers the assistant turns only, each with the end-of-turn token that closes it, so the
model learns to stop. The turns are located by rendering the chat template and mapping characters to tokens,
never by matching Phi-3's strings, so any tokenizer with a chat template works.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Example = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class TokenizedDataset:
    """A training or validation set ready for the trainer, with the counts a job reports."""

    dataset: Dataset  # columns input_ids and completion_mask (1: the loss covers this token)
    num_tokens: int  # all tokens of the kept examples, after truncation
    num_trained_tokens: int  # the tokens the loss covers
    num_dropped: int  # examples left without any trained token by truncation


def load_tokenized_dataset(
    path: Path, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int, train_on_inputs: bool = False
) -> TokenizedDataset:
    """Read and tokenise a JSONL file, truncating each example to `max_seq_length` tokens.

    Examples with no trained token left are dropped; a file where none is left is an error.
    """
    input_ids, masks = [], []
    num_dropped = 0
    for example in read_jsonl(path):
        ids, mask = tokenize_example(example, tokenizer, train_on_inputs=train_on_inputs)
        ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not any(mask):
            num_dropped += 1
            continue
        input_ids.append(ids)
        masks.append(mask)
    if num_dropped:
        logger.warning(
            "Dropped %d of %d examples of %s: no trained token within max_seq_length=%d",
            num_dropped,
            num_dropped + len(input_ids),
            path.name,
            max_seq_length,
        )
    if not input_ids:
        raise ValueError(
            f"No example of {path.name} has a trained token within max_seq_length={max_seq_length}"
        )
    return TokenizedDataset(
        dataset=Dataset.from_dict({"input_ids": input_ids, "completion_mask": masks}),
        num_tokens=sum(len(ids) for ids in input_ids),
        num_trained_tokens=sum(sum(mask) for mask in masks),
        num_dropped=num_dropped,
    )


def read_jsonl(path: Path) -> list[Example]:
    """The JSON objects of a JSONL file, skipping blank lines."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1: trained) of one example of any of the three formats."""
    if "messages" in example:
        return tokenize_conversation(example["messages"], tokenizer, train_on_inputs=train_on_inputs)
    if "prompt" in example:
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
        return tokenize_conversation(messages, tokenizer, train_on_inputs=train_on_inputs)
    if "text" in example:
        return tokenize_text(example["text"], tokenizer)
    raise ValueError(f"Unknown example format with keys {sorted(example)}")


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Plain text is trained on entirely, ending with the eos token so the model learns where text ends."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, *, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """Render `messages` with the chat template; the mask covers the assistant turns with weight 1.

    With `train_on_inputs` every token is trained except the assistant turns with weight 0.
    """
    turns = [{"role": message["role"], "content": message["content"]} for message in messages]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    # Tokenised as apply_chat_template(tokenize=True) does: the template already holds any special tokens.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    mask = [int(train_on_inputs)] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            for position in _assistant_turn_tokens(tokenizer, turns, index, text, ids, offsets):
                mask[position] = int(message.get("weight", 1))
    return ids, mask


def _assistant_turn_tokens(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Message],
    index: int,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
) -> list[int]:
    """Positions of the tokens of assistant turn `index`: its content and the end-of-turn token after it."""
    # The conversation up to this turn, ending with the generation prompt, is where the reply begins.
    prompt = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
    if not text.startswith(prompt):
        raise ValueError("The chat template renders a conversation's beginning differently from the whole")
    content = turns[index]["content"].strip()  # some templates trim the content
    start = text.find(content, len(prompt))
    if start < 0:
        raise ValueError(f"The chat template does not render assistant turn {index} verbatim")
    end = start + len(content)
    positions = [position for position, (first, last) in enumerate(offsets) if first < end and last > start]
    # The first token after the content closes the turn when it is special (<|end|> for Phi-3); training on
    # it teaches the model to stop. Whitespace the template writes after it is never generated.
    after = next((position for position, (first, _) in enumerate(offsets) if first >= end), None)
    if after is not None and _is_special(tokenizer, ids[after]):
        positions.append(after)
    return positions


def _is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)
