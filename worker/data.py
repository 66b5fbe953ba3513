"""Turns a training file into token ids and a loss mask, the way Phi-3 is fine-tuned.

The API has already validated the file with the record models of `app.dataset_format`, which read it here
too: chat (`{"messages": [...]}`, an assistant message may carry `"weight": 0|1`), prompt/completion
(`{"prompt", "completion"}`, a user turn answered by an assistant turn) or plain text (`{"text"}`, trained on
entirely).

By default the loss covers the assistant turns only, each with the end-of-turn token that closes it, so the
model learns to stop. The turns are located by rendering the chat template and mapping characters to tokens,
never by matching Phi-3's strings, so any tokenizer with a chat template works.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from app.dataset_format import (
    ChatRecord,
    Message,
    PromptCompletionRecord,
    Record,
    RecordError,
    load_line,
    parse_record,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedDataset:
    """A training or validation set ready for the trainer, with the counts a job reports."""

    dataset: Dataset  # columns input_ids and completion_mask (1: the loss covers this token)
    num_tokens: int  # all tokens of the kept examples, after truncation
    num_trained_tokens: int  # the tokens the loss covers
    num_dropped: int  # examples left without any trained token by truncation
    num_truncated_tokens: int = 0  # tokens past max_seq_length, of kept and dropped examples alike
    num_truncated_trained_tokens: int = 0  # those of them the loss would have covered


def load_tokenized_dataset(
    path: Path, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int, train_on_inputs: bool = False
) -> TokenizedDataset:
    """Read and tokenise a JSONL file, truncating each example to `max_seq_length` tokens.

    Examples with no trained token left are dropped; a file where none is left is an error.
    """
    input_ids, masks = [], []
    num_dropped = num_truncated = num_truncated_trained = 0
    for example in read_jsonl(path):
        ids, mask = tokenize_example(example, tokenizer, train_on_inputs=train_on_inputs)
        num_truncated += max(len(ids) - max_seq_length, 0)
        num_truncated_trained += sum(mask[max_seq_length:])
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
        num_truncated_tokens=num_truncated,
        num_truncated_trained_tokens=num_truncated_trained,
    )


def read_jsonl(path: Path) -> list[Record]:
    """The records of a JSONL file, skipping blank lines; ValueError naming the line of one that is not."""
    path = Path(path)
    records = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                obj = load_line(line, first=number == 1)
                if obj is not None:
                    records.append(parse_record(obj))
            except RecordError as error:
                raise ValueError(f"{path.name}, line {number}: {error.message}") from None
    return records


def tokenize_example(
    example: Record | Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1: trained) of one example of any of the three formats (a JSON object is
    read as a record first)."""
    record = example if isinstance(example, Record) else parse_record(example)
    if isinstance(record, PromptCompletionRecord):
        record = record.as_chat()
    if isinstance(record, ChatRecord):
        return tokenize_conversation(record.messages, tokenizer, train_on_inputs=train_on_inputs)
    return tokenize_text(record.text, tokenizer)


def chat_turns(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: role and content, the fields it renders."""
    return [{"role": message.role, "content": message.content} for message in map(_message, messages)]


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Plain text is trained on entirely, ending with the eos token so the model learns where text ends."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def tokenize_conversation(
    messages: Sequence[Message | Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on_inputs: bool = False,
) -> tuple[list[int], list[int]]:
    """Render `messages` with the chat template; the mask covers the assistant turns with weight 1.

    With `train_on_inputs` every token is trained except the assistant turns with weight 0.
    """
    parsed = [_message(message) for message in messages]
    turns = chat_turns(parsed)
    # Untokenized, the template gives text; transformers types every result apply_chat_template can give.
    text = cast(str, tokenizer.apply_chat_template(turns, tokenize=False))
    # Tokenised as apply_chat_template(tokenize=True) does: the template already holds any special tokens.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    mask = [int(train_on_inputs)] * len(ids)
    for index, message in enumerate(parsed):
        if message.role == "assistant":
            for position in _assistant_turn_tokens(tokenizer, turns, index, text, ids, offsets):
                mask[position] = message.weight
    return ids, mask


def _message(message: Message | Mapping[str, Any]) -> Message:
    return message if isinstance(message, Message) else Message.model_validate(message)


def _assistant_turn_tokens(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict[str, str]],
    index: int,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
) -> list[int]:
    """Positions of the tokens of assistant turn `index`: its content and the end-of-turn token after it."""
    prompt = _reply_prefix(tokenizer, turns, index)
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


def _reply_prefix(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], index: int) -> str:
    """The text before the reply of turn `index`: the conversation up to it, ending with the generation
    prompt. A conversation that opens with an assistant turn (which the format allows) has nothing before
    it, and templates refuse to render nothing: its header is cut from the turn rendered alone instead."""
    if index:
        prefix = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
        return cast(str, prefix)  # untokenized, as in tokenize_conversation
    marker = "\x00reply\x00"
    rendered = tokenizer.apply_chat_template([{"role": "assistant", "content": marker}], tokenize=False)
    alone = cast(str, rendered)
    return alone[: alone.find(marker)] if marker in alone else ""


def _is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)
