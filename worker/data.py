"""Turns a training file into token ids and a loss mask, the way Phi-3 is fine-tuned.

The API has already validated the file with the record models of `app.dataset_format`, which read it here
too: chat (`{"messages": [...]}`, an assistant message may carry `"weight": 0|1`), prompt/completion
(`{"prompt", "completion"}`, a user turn answered by an assistant turn) or plain text (`{"text"}`, trained on
entirely), or, for a DPO job, preference (`{"input", "preferred_output", "non_preferred_output"}`).

Each example becomes token ids and a loss mask as `app.chat_tokens` defines (by default the assistant turns
only, each with its end-of-turn token), the definition the API's dataset report counts with too. A preference
pair is tokenised the same way: each answer is the trained turn of its conversation, the tokens before it
the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

# chat_turns and tokenize_conversation are the worker's as much as tokenize_example: imported from here too.
from app.chat_tokens import chat_turns as chat_turns
from app.chat_tokens import tokenize_conversation as tokenize_conversation
from app.chat_tokens import tokenize_example
from app.dataset_format import Message, PreferenceRecord, Record, RecordError, load_line, parse_record

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


@dataclass(frozen=True)
class TokenizedPreferences:
    """A DPO job's training or validation set, with the counts a job reports."""

    dataset: Dataset  # columns prompt_ids, chosen_ids, rejected_ids (TRL's DPOTrainer's tokenised columns)
    num_tokens: int  # all tokens of the kept pairs, the prompt counted with each answer, after truncation
    num_dropped: int  # pairs whose prompt alone fills max_seq_length
    num_truncated_tokens: int = 0  # answer tokens past max_seq_length, of kept pairs


def load_preference_dataset(
    path: Path, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> TokenizedPreferences:
    """Read and tokenise a preference file: each prompt with an answer is cut to `max_seq_length` tokens,
    the answer's end going first (TRL's keep_start). A pair whose prompt alone fills it is dropped; a file
    where none is left is an error."""
    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    num_dropped = num_truncated = num_tokens = 0
    for record in read_jsonl(path):
        if not isinstance(record, PreferenceRecord):
            raise ValueError(f"{path.name} is in {record.format} format; DPO trains on preference pairs")
        prompt, chosen, rejected = tokenize_preference(record, tokenizer)
        room = max_seq_length - len(prompt)
        if room <= 0:
            num_dropped += 1
            continue
        num_truncated += max(len(chosen) - room, 0) + max(len(rejected) - room, 0)
        chosen, rejected = chosen[:room], rejected[:room]
        num_tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        for name, ids in zip(columns, (prompt, chosen, rejected), strict=True):
            columns[name].append(ids)
    if num_dropped:
        logger.warning(
            "Dropped %d preference pairs of %s: their input fills max_seq_length=%d",
            num_dropped,
            path.name,
            max_seq_length,
        )
    if not columns["prompt_ids"]:
        raise ValueError(f"No preference pair of {path.name} leaves room for an answer within max_seq_length")
    return TokenizedPreferences(
        dataset=Dataset.from_dict(columns),
        num_tokens=num_tokens,
        num_dropped=num_dropped,
        num_truncated_tokens=num_truncated,
    )


def tokenize_preference(
    record: PreferenceRecord, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int], list[int]]:
    """The prompt's token ids, and each answer's: its content and end-of-turn token, as a supervised job
    trains an assistant turn. The prompt is the tokens both conversations share before their answers."""
    # The input's own assistant turns are context, never trained on.
    history = [
        message.model_copy(update={"weight": 0}) if message.role == "assistant" else message
        for message in record.input.messages
    ]
    chosen_prompt, chosen = _answer_tokens([*history, record.preferred], tokenizer)
    rejected_prompt, rejected = _answer_tokens([*history, record.non_preferred], tokenizer)
    shared = 0
    while shared < min(len(chosen_prompt), len(rejected_prompt)):
        if chosen_prompt[shared] != rejected_prompt[shared]:
            break
        shared += 1
    return chosen_prompt[:shared], chosen_prompt[shared:] + chosen, rejected_prompt[shared:] + rejected


def _answer_tokens(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """The tokens before a conversation's last turn, the trained one, and that turn's."""
    ids, mask = tokenize_conversation(messages, tokenizer)
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    return ids[:first], ids[first:last]


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
