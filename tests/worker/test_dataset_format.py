"""The upload validator and the worker's reader share one record format (app.dataset_format): what the API
accepts the worker reads as the same record, and what one refuses the other refuses with the same words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from app.dataset_format import ROLES, ChatRecord, load_line, validate_record
from app.files.validation import read_lines, validate_lines
from worker.data import read_jsonl, tokenize_example

BOM = b"\xef\xbb\xbf"
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Talk like a pirate."},
            {"role": "user", "content": "Hello", "name": "alice"},
            {"role": "assistant", "content": "Ahoy!", "weight": 0},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "Arr, matey! 日本 ü", "weight": 1},
        ]
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo ho"}]},
]
PROMPT_COMPLETION = [{"prompt": "Hello", "completion": "Arr!"}, {"prompt": "", "completion": "Yo ho ho"}]
TEXT = [{"text": "Yo ho ho and a bottle of rum."}, {"text": "日本"}]


def write(path: Path, records: list, *, bom: bool = False) -> Path:
    """A JSONL file as a user may write it: CRLF endings, a blank line, a byte order mark when asked."""
    lines = [json.dumps(record, ensure_ascii=False).encode() + b"\r\n" for record in records]
    path.write_bytes((BOM if bom else b"") + lines[0] + b"\r\n" + b"".join(lines[1:]))
    return path


@pytest.mark.parametrize(
    "records", [CHAT, PROMPT_COMPLETION, TEXT], ids=["chat", "prompt_completion", "text"]
)
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_a_file_accepted_at_upload_is_read_by_the_worker_as_the_same_records(
    records: list, bom: bool, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write(tmp_path / "train.jsonl", records, bom=bom)
    with path.open("rb") as stream:
        report = validate_lines(read_lines(stream))
    assert report.ok, report.problems

    read = read_jsonl(path)
    # What the validator made of each line (the worker must not read it any other way).
    validated = [
        validate_record(obj, report.format)
        for number, line in enumerate(path.read_bytes().splitlines(keepends=True), start=1)
        if (obj := load_line(line, first=number == 1)) is not None
    ]
    assert read == validated
    assert [record.format for record in read] == [report.format] * len(records)
    assert report.examples == len(read)
    assert report.characters == sum(record.characters for record in read)
    if report.format == "chat":
        assert report.messages == sum(len(record.messages) for record in read)
        assert report.assistant_turns == sum(record.trained_turns for record in read)
    # The worker trains the record it read exactly as the JSON object that was uploaded.
    for record, obj in zip(read, records, strict=True):
        assert tokenize_example(record, tokenizer) == tokenize_example(obj, tokenizer)


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "y", "tool_calls": []}]},
        {"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "y", "weight": True}]},
        {"messages": [{"role": "assistant", "content": "y", "name": None}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
        {"messages": []},
        {"prompt": "p", "completion": ""},
        {"text": ""},
        {"text": "x", "source": "wiki"},
        {"input": "x"},
    ],
)
def test_a_record_refused_at_upload_is_refused_by_the_worker_with_the_same_message(
    record: dict, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    line = json.dumps(record).encode() + b"\n"
    (problem,) = validate_lines([line]).problems
    path = tmp_path / "train.jsonl"
    path.write_bytes(line)
    with pytest.raises(ValueError) as refused:
        read_jsonl(path)
    assert str(refused.value) == f"train.jsonl, line 1: {problem.message}"
    with pytest.raises(ValueError) as refused:
        tokenize_example(record, tokenizer)
    assert str(refused.value) == problem.message


def test_every_role_of_the_format_is_accepted_at_upload_and_trained_by_the_worker(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Including a conversation that opens with an assistant turn, which the format allows."""
    for role in ROLES:
        record = {"messages": [{"role": role, "content": "Hello"}, {"role": "assistant", "content": "Arr!"}]}
        assert validate_lines([json.dumps(record).encode()]).ok
        ids, mask = tokenize_example(ChatRecord.model_validate(record), tokenizer)
        trained = tokenizer.decode([token for token, kept in zip(ids, mask, strict=True) if kept])
        assert trained == ("Hello<|end|>" if role == "assistant" else "") + "Arr!<|end|>"
