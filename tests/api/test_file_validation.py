"""The JSONL validator as pure functions: lines of bytes in, a report out."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from app.files.validation import MAX_PROBLEMS, read_lines, validate_lines


def lines(*records: Any) -> list[bytes]:
    """JSONL lines; bytes and str items are taken as raw lines."""
    out = []
    for record in records:
        if isinstance(record, bytes):
            out.append(record)
        elif isinstance(record, str):
            out.append(record.encode() + b"\n")
        else:
            out.append(json.dumps(record).encode() + b"\n")
    return out


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def problems(report) -> list[tuple[int | None, str]]:
    return [(problem.line, problem.code) for problem in report.problems]


def only_problem(*records: Any) -> tuple[int | None, str]:
    report = validate_lines(lines(*records))
    assert len(report.problems) == 1, report.problems
    return problems(report)[0]


GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))


def test_chat_stats() -> None:
    report = validate_lines(
        lines(
            chat(("system", "be brief"), ("user", "2+2?"), ("assistant", "4")),
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "bc", "weight": 1},
                ]
            },
        )
    )
    assert report.ok
    assert report.stats() == {
        "examples": 2,
        "format": "chat",
        "messages": 5,
        "assistant_turns": 2,
        "characters": len("be brief2+2?4") + len("abc"),
        "max_example_characters": len("be brief2+2?4"),
    }


def test_prompt_completion_stats() -> None:
    report = validate_lines(lines({"prompt": "ab", "completion": "c"}, {"prompt": "", "completion": "xyz"}))
    assert report.ok
    assert report.stats() == {
        "examples": 2,
        "format": "prompt_completion",
        "messages": None,
        "assistant_turns": None,
        "characters": 6,
        "max_example_characters": 3,
    }


def test_text_stats() -> None:
    report = validate_lines(lines({"text": "hello"}, {"text": "hé"}))
    assert report.ok
    assert report.stats()["format"] == "text"
    assert report.stats()["examples"] == 2
    assert report.stats()["characters"] == 7


def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    report = validate_lines(lines({"text": "a"}, "", "   ", "{bad", b"\r\n", {"text": "b"}))
    assert report.stats()["examples"] == 2
    assert problems(report) == [(4, "invalid_json")]


def test_last_line_without_newline_and_crlf_endings() -> None:
    report = validate_lines([b'{"text": "a"}\r\n', b'{"text": "b"}'])
    assert report.ok and report.examples == 2


def test_byte_order_mark_accepted_on_the_first_line_only() -> None:
    bom = b"\xef\xbb\xbf"
    assert validate_lines([bom + b'{"text": "a"}\n']).ok
    report = validate_lines([b'{"text": "a"}\n', bom + b'{"text": "b"}\n'])
    assert problems(report) == [(2, "invalid_json")]


def test_invalid_utf8_names_line_and_byte() -> None:
    report = validate_lines(lines({"text": "a"}, b'{"text": "caf\xe9"}\n'))
    assert problems(report) == [(2, "invalid_utf8")]
    assert "byte 14" in report.problems[0].message


@pytest.mark.parametrize(
    ("record", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ('"text"', "not_an_object"),
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),
        ({"input": "x", "output": "y"}, "unknown_format"),
        ({"text": "x", "source": "wiki"}, "unknown_key"),
        ({"text": ""}, "invalid_text"),
        ({"text": 3}, "invalid_text"),
        ({"prompt": "p"}, "invalid_completion"),
        ({"prompt": "p", "completion": ""}, "invalid_completion"),
        ({"prompt": None, "completion": "c"}, "invalid_prompt"),
        ({"messages": []}, "invalid_messages"),
        ({"messages": "hi"}, "invalid_messages"),
        ({"messages": ["hi"]}, "invalid_message"),
        (chat(("user", "hi")), "missing_assistant_turn"),
        (chat(("user", "hi"), ("bot", "yo")), "invalid_role"),
        ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "invalid_role"),
        ({"messages": [{"role": "assistant"}]}, "invalid_content"),
        ({"messages": [{"role": "assistant", "content": [{"type": "text"}]}]}, "invalid_content"),
        ({"messages": [{"role": "assistant", "content": "y", "tool_calls": []}]}, "unknown_key"),
        ({"messages": [{"role": "assistant", "content": "y", "name": 7}]}, "invalid_name"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
         "invalid_weight"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
         "invalid_weight"),
        ({"messages": [{"role": "assistant", "content": "y", "weight": True}]}, "invalid_weight"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
         "missing_assistant_turn"),
        (chat(("user", "x"), ("assistant", "y"), tools=[]), "unknown_key"),
    ],
)  # fmt: skip
def test_each_rule(record: Any, code: str) -> None:
    assert only_problem(record) == (1, code)


def test_allowed_message_extras() -> None:
    record = {
        "messages": [
            {"role": "user", "content": "", "name": "alice"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "final", "weight": 1},
        ]
    }
    report = validate_lines(lines(record))
    assert report.ok
    assert report.stats()["assistant_turns"] == 1


def test_error_messages_say_what_was_found() -> None:
    report = validate_lines(lines(chat(("user", "x"), ("robot", "y")), {"messages": [{"role": "assistant"}]}))
    assert "messages[1].role" in report.problems[0].message and "'robot'" in report.problems[0].message
    assert "messages[0].content" in report.problems[1].message and "missing" in report.problems[1].message


def test_format_is_detected_from_the_first_record_and_enforced() -> None:
    report = validate_lines(lines("", {"prompt": "p", "completion": "c"}, GOOD_CHAT, {"text": "t"}))
    assert report.format == "prompt_completion"
    assert problems(report) == [(3, "format_mismatch"), (4, "format_mismatch")]
    assert "detected on line 2" in report.problems[0].message


def test_an_invalid_first_record_still_sets_the_format() -> None:
    report = validate_lines(lines(chat(("user", "x")), {"text": "t"}))
    assert problems(report) == [(1, "missing_assistant_turn"), (2, "format_mismatch")]


def test_one_problem_per_line_and_all_lines_checked() -> None:
    report = validate_lines(lines(GOOD_CHAT, "{", chat(("bot", "x")), GOOD_CHAT, "[]"))
    assert problems(report) == [(2, "invalid_json"), (3, "invalid_role"), (5, "not_an_object")]
    assert report.examples == 2


def test_problems_are_capped_but_counted() -> None:
    report = validate_lines(lines(*(["{"] * (MAX_PROBLEMS + 50))))
    assert len(report.problems) == MAX_PROBLEMS
    assert report.problem_count == MAX_PROBLEMS + 50
    assert report.summary("train.jsonl").startswith(
        f"{MAX_PROBLEMS + 50} problems in train.jsonl (first 100 listed)"
    )


def test_summary_names_count_file_and_first_line() -> None:
    report = validate_lines(lines(GOOD_CHAT, "{", "[]", "{"))
    assert report.summary("train.jsonl").startswith(
        "3 problems in train.jsonl; first on line 2: Invalid JSON"
    )
    single = validate_lines(lines("[]"))
    assert (
        single.summary("a.jsonl")
        == "1 problem in a.jsonl; first on line 1: Expected a JSON object, got an array"
    )


@pytest.mark.parametrize("content", [[], [b"\n", b"  \n", b"\r\n"]])
def test_empty_or_blank_file(content: list[bytes]) -> None:
    report = validate_lines(content)
    assert problems(report) == [(None, "empty_file")]
    assert (
        report.summary("e.jsonl") == "1 problem in e.jsonl; first in the file: " + report.problems[0].message
    )


def test_a_file_of_only_bad_lines_is_not_called_empty() -> None:
    assert problems(validate_lines(lines("{"))) == [(1, "invalid_json")]


def test_read_lines_cuts_overlong_lines_and_keeps_numbering() -> None:
    stream = io.BytesIO(b'{"text": "ok"}\n' + b'{"text": "' + b"x" * 100 + b'"}\n{"text": "ok"}\n')
    read = list(read_lines(stream, max_line_bytes=20))
    assert len(read) == 3
    assert len(read[1]) == 21
    report = validate_lines(read, max_line_bytes=20)
    assert problems(report) == [(2, "line_too_long")]
    assert report.examples == 2


def test_read_lines_keeps_a_line_exactly_at_the_limit() -> None:
    line = b'{"text": "abc"}\n'
    read = list(read_lines(io.BytesIO(line * 2), max_line_bytes=len(line)))
    assert read == [line, line]
    assert validate_lines(read, max_line_bytes=len(line)).ok
