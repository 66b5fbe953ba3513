"""A training example as token ids and a loss mask, the way Phi-3 is fine-tuned: defined once, for the
worker that trains on it (`worker.data`, with the transformers tokenizer) and for the API's dataset report
(`app.files.report`, with `app.base_tokenizer`, which needs no torch), so that the report counts exactly the
tokens the worker trains.

By default the loss covers the assistant turns only, each with the end-of-turn token that closes it, so the
model learns to stop. The turns are located by rendering the chat template and mapping characters to tokens,
never by matching Phi-3's strings, so any tokenizer with a chat template works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

from app.dataset_format import ChatRecord, Message, PromptCompletionRecord, Record, TextRecord, parse_record


class ChatTokenizer(Protocol):
    """What tokenizing an example needs of a tokenizer: the part of transformers' tokenizer interface that
    `app.base_tokenizer.BaseTokenizer` implements too (`apply_chat_template(turns, tokenize=False,
    add_generation_prompt=…)` and `tokenizer(text, add_special_tokens=…, return_offsets_mapping=…)`)."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    @property
    def added_tokens_decoder(self) -> Mapping[int, Any]: ...  # each with `.special`

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def tokenize_example(
    example: Record | Mapping[str, Any], tokenizer: ChatTokenizer, *, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1: trained) of one example of the chat, prompt/completion or text format (a
    JSON object is read as a record first)."""
    record = example if isinstance(example, Record) else parse_record(example)
    if isinstance(record, PromptCompletionRecord):
        record = record.as_chat()
    if isinstance(record, ChatRecord):
        return tokenize_conversation(record.messages, tokenizer, train_on_inputs=train_on_inputs)
    if isinstance(record, TextRecord):
        return tokenize_text(record.text, tokenizer)
    raise ValueError(f"A {record.format} record is a pair of examples, not one")


def chat_turns(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: role and content, the fields it renders."""
    return [{"role": message.role, "content": message.content} for message in map(_message, messages)]


def tokenize_text(text: str, tokenizer: ChatTokenizer) -> tuple[list[int], list[int]]:
    """Plain text is trained on entirely, ending with the eos token so the model learns where text ends."""
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def tokenize_conversation(
    messages: Sequence[Message | Mapping[str, Any]],
    tokenizer: ChatTokenizer,
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
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    mask = [int(train_on_inputs)] * len(ids)
    for index, message in enumerate(parsed):
        if message.role == "assistant":
            for position in _assistant_turn_tokens(tokenizer, turns, index, text, ids, offsets):
                mask[position] = message.weight
    return ids, mask


def _message(message: Message | Mapping[str, Any]) -> Message:
    return message if isinstance(message, Message) else Message.model_validate(message)


def _assistant_turn_tokens(
    tokenizer: ChatTokenizer,
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


def _reply_prefix(tokenizer: ChatTokenizer, turns: list[dict[str, str]], index: int) -> str:
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


def _is_special(tokenizer: ChatTokenizer, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)
