"""The upload validator's fast path (`app.dataset_format.line_checker`: orjson and plain checks) against the
record models it stands in for, over many generated records and lines, valid and not: it must pass exactly
the lines the models accept, with the same statistics, and a file's report (problems, their messages and
order, statistics) must be the same whether the fast path runs or every line goes to the models."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from app import dataset_format
from app.dataset_format import (
    CHAT,
    PROMPT_COMPLETION,
    TEXT,
    ChatRecord,
    Record,
    RecordError,
    RecordStats,
    detect_format,
    line_checker,
    load_line,
    validate_record,
)
from app.files.validation import MAX_LINE_BYTES, validate_lines

SEED = 20261202
FORMATS = (CHAT, PROMPT_COMPLETION, TEXT)
STRINGS = [
    "",
    "x",
    "hello world",
    "héllo",
    "日本語",
    "😀 emoji",
    "a\nb\tc",
    "\x00",
    "\u2028",
    "\\",
    '"q"',
    "y" * 300,
]
ODD_VALUES: list[Any] = [None, True, False, 0, 1, -1, 2, 0.0, 1.0, -0.0, 0.5, 1e300, [], {}, ["x"], {"a": 1}]
WEIGHTS: list[Any] = [0, 1, 0.0, 1.0, -0.0, True, False, 2, -1, 0.5, "1", None, [], {}]
ROLES: list[Any] = ["system", "user", "assistant", "assistant", "user", "bot", "", "User", None, 1, []]


def string_or_odd(rng: random.Random, odd: float) -> Any:
    return rng.choice(ODD_VALUES) if rng.random() < odd else rng.choice(STRINGS)


def message(rng: random.Random, odd: float) -> Any:
    if rng.random() < odd / 4:
        return rng.choice(["hi", None, [], 1, ["role"]])
    msg: dict[str, Any] = {}
    keys = ["role", "content"]
    if rng.random() < 0.3:
        keys.append("name")
    if rng.random() < 0.3:
        keys.append("weight")
    if rng.random() < odd / 3:
        keys.append(rng.choice(["tool_calls", "contents", "Role", "weight", "name"]))
    rng.shuffle(keys)
    for key in keys:
        if key == "role":
            msg[key] = (
                rng.choice(ROLES) if rng.random() < odd else rng.choice(["system", "user", "assistant"])
            )
        elif key == "weight":
            msg[key] = rng.choice(WEIGHTS) if rng.random() < odd * 2 else rng.choice([0, 1])
        elif key in ("content", "name"):
            msg[key] = string_or_odd(rng, odd / 2)
        else:
            msg[key] = rng.choice(ODD_VALUES)
    for key in ("role", "content"):
        if rng.random() < odd / 6:
            msg.pop(key, None)
    return msg


def record(rng: random.Random, odd: float) -> dict[str, Any]:
    """A record of any format, valid more often than not when `odd` is small, and wrong in many ways."""
    kind = rng.choice(FORMATS)
    obj: dict[str, Any]
    if kind == CHAT:
        messages: Any = [message(rng, odd) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.7:  # most conversations end with an assistant answer
            messages.append({"role": "assistant", "content": rng.choice(STRINGS)})
        if rng.random() < odd / 4:
            messages = rng.choice([[], "hi", None, {"role": "user"}, 3])
        obj = {"messages": messages}
    elif kind == PROMPT_COMPLETION:
        obj = {"prompt": string_or_odd(rng, odd), "completion": string_or_odd(rng, odd)}
    else:
        obj = {"text": string_or_odd(rng, odd)}
    if rng.random() < odd / 3:
        obj.pop(rng.choice(list(obj)))
    if rng.random() < odd / 3:
        obj[rng.choice(["source", "tools", "messages", "prompt", "completion", "text", "input"])] = (
            rng.choice(STRINGS + ODD_VALUES)
        )
    return obj


def records(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [record(rng, odd=rng.choice([0.0, 0.05, 0.2, 0.6])) for _ in range(count)]


def model_stats(line: bytes, record_format: str) -> RecordStats | None:
    """What the models make of a line that is not a file's first: its statistics as a valid record of
    `record_format`, or None."""
    try:
        obj = load_line(line)
        if obj is None or detect_format(obj) != record_format:
            return None
        parsed: Record = validate_record(obj, record_format)
    except RecordError:
        return None
    if isinstance(parsed, ChatRecord):
        return len(parsed.messages), parsed.trained_turns, parsed.characters
    return 0, 0, parsed.characters


def test_the_generated_records_are_valid_and_invalid_in_many_ways() -> None:
    outcomes: dict[str, int] = {}
    for obj in records(3000):
        line = json.dumps(obj).encode()
        try:
            parsed = load_line(line)
            assert parsed is not None
            validate_record(parsed, detect_format(parsed))
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except RecordError as error:
            outcomes[error.code] = outcomes.get(error.code, 0) + 1
    assert outcomes["ok"] > 1000
    expected = {
        "unknown_format", "unknown_key", "invalid_role", "invalid_content", "invalid_name",
        "invalid_weight", "invalid_message", "invalid_messages", "missing_assistant_turn", "invalid_prompt",
        "invalid_completion", "invalid_text",
    }  # fmt: skip
    assert expected <= set(outcomes), outcomes


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["utf8", "escaped"])
def test_the_fast_path_accepts_exactly_what_the_models_accept(ensure_ascii: bool) -> None:
    checkers = {name: line_checker(name) for name in FORMATS}
    accepted = 0
    for obj in records(6000, seed=SEED + ensure_ascii):
        line = json.dumps(obj, ensure_ascii=ensure_ascii).encode() + b"\n"
        for name, check in checkers.items():
            assert check(line) == model_stats(line, name), (name, line)
            accepted += check(line) is not None
    assert accepted > 2000


def test_the_fast_checks_agree_with_the_models_on_each_rule() -> None:
    """The table of `tests/api/test_file_validation.py` and the corners of the rules, one by one."""
    cases: list[Any] = [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": w}]}
        for w in WEIGHTS
    ] + [
        {"messages": [{"role": r, "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}
        for r in ("system", "user", "assistant")
    ] + [
        {"messages": [{"role": "assistant", "content": "y", "name": n}]} for n in ["", "a", None, 1, []]
    ] + [
        {"messages": [{"role": "assistant", "content": "y", "weight": 0}]},
        {"messages": [{"role": "assistant", "content": ""}]},
        {"messages": [{"role": "assistant", "content": "y", "weight": 1, "name": "n"}]},
        {"messages": [{"content": "y", "weight": 1, "name": "n"}]},
        {"messages": [{"role": "assistant", "weight": 1, "name": "n"}]},
        {"messages": [{"role": "assistant", "content": "y", "tool_calls": []}]},
        {"messages": []},
        {"messages": [["assistant", "y"]]},
        {"messages": [{"role": "assistant", "content": "y"}], "tools": []},
        {"prompt": "", "completion": "c"},
        {"prompt": "p", "completion": ""},
        {"prompt": "p"},
        {"completion": "c"},
        {"prompt": "p", "completion": "c", "text": "t"},
        {"text": ""},
        {"text": "t", "source": "s"},
        {"text": ["t"]},
    ]  # fmt: skip
    for obj in cases:
        line = json.dumps(obj).encode()
        for name in FORMATS:
            assert line_checker(name)(line) == model_stats(line, name), (name, obj)


# JSON that orjson and `json` read differently, and lines that are not records at all: orjson refuses
# what `json` may take (NaN, lone surrogates, integers past 64 bits), and these then go to the models.
ODD_LINES = [
    b'{"text": NaN}\n',
    b'{"text": "a", "x": Infinity}\n',
    b'{"text": "\\ud800"}\n',
    b'{"messages": [{"role": "assistant", "content": "\\ud800"}]}\n',
    b'{"messages": [{"role": "assistant", "content": "\\udc00\\ud800x"}]}\n',
    b'{"prompt": "\\ud800", "completion": "c"}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 18446744073709551617}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 1e400}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 1.0}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 1E0}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": -0}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 01}]}\n',
    b'{"text": "a", "text": "b"}\n',
    b'{"text": "a", "text": ""}\n',
    b'{"text": "", "text": "b"}\n',
    b'{"messages": [{"role": "bot", "role": "assistant", "content": "y"}]}\n',
    b'{"text": "a"}\x0c\n',
    b'\x0c{"text": "a"}\n',
    b'{"text": "a",}\n',
    b'{"text": "a\x01"}\n',
    b'{"text": "a\x7f"}\n',
    b'{"text": "\xed\xa0\x80"}\n',
    b'{"text": "\xc0\xaf"}\n',
    b'{"text": "\xf4\x90\x80\x80"}\n',
    b'{"text": "\xff"}\n',
    b'\xef\xbb\xbf{"text": "bom"}\n',
    b'{"text": "a"}\r\n',
    b'  {"text": "a"}  \t\r\n',
    b'{"text": "a"} {"text": "b"}\n',
    b"\n",
    b"   \r\n",
    b"\x0b\n",
    b"\xc2\xa0\n",
    b"[]\n",
    b'"text"\n',
    b"null\n",
    b"{\n",
    b'{"text": "' + b"x" * 200 + b'"}\n',
    b"[" * 5000 + b"]" * 5000 + b"\n",
    b'{"text": "a", "x": ' + b"[" * 1020 + b"]" * 1020 + b"}\n",
    b'{"messages": [{"role": "assistant", "content": ' + b"[" * 1020 + b"]" * 1020 + b"}]}\n",
    b'{"text": "\\u00e9\\ud83d\\ude00"}\n',
    # Text no tokenizer reads and numbers no float holds: refused by the models too, with the line.
    b'{"text": "a", "x": "\\uDBFF"}\n',
    b'{"text": "\\\\ud800"}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "\\ud800": 1}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "name": "\\udfff"}]}\n',
    b'{"messages": [{"role": "assistant", "content": "y", "weight": 1' + b"0" * 5000 + b"}]}\n",
    b'{"messages": [{"role": "assistant", "content": "y", "weight": -Infinity}]}\n',
    b'{"prompt": 1e999, "completion": "c"}\n',
    b'{"text": "a", "x": ' + b"[" * 900 + b'"\\ud800"' + b"]" * 900 + b"}\n",
    b'{"prompt": "p", "completion": "c"}',
    b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
]


INSERTS = [b'"', b"\\", b",", b":", b"{", b"}", b"[", b"]", b" ", b"0", b"1", b"\x00", b"\xff", b"\xc3",
           b"\xed\xa0\x80", b"\\u", b"\\ud800", b"NaN", b"\r", b"\x0c"]  # fmt: skip


def mutated(rng: random.Random, line: bytes) -> bytes:
    """`line` with a few random bytes changed, inserted or removed."""
    data = bytearray(line.rstrip(b"\n"))
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        action = rng.random()
        insert = rng.choice(INSERTS)
        if action < 0.4:
            data[at:at] = insert
        elif action < 0.7 and at < len(data):
            del data[at]
        elif at < len(data):
            data[at : at + 1] = insert
    return bytes(data) + b"\n"


def file_lines(count: int, first: Any, seed: int) -> list[bytes]:
    """A file's lines: `first`, then generated records, mutated lines and the odd lines, mixed."""
    rng = random.Random(seed)
    lines = [first]
    for obj in records(count, seed=seed):
        line = orjson.dumps(obj) + b"\n" if rng.random() < 0.5 else json.dumps(obj).encode() + b"\n"
        lines.append(mutated(rng, line) if rng.random() < 0.2 else line)
    lines += ODD_LINES
    rng.shuffle(lines[1:])
    return lines


def report_of(lines: list[bytes], *, fast: bool, max_line_bytes: int) -> dict[str, Any]:
    report = validate_lines(lines, max_line_bytes, fast=fast)
    return {
        "problems": [problem.as_dict() for problem in report.problems],
        "problem_count": report.problem_count,
        "stats": report.stats(),
        "format_line": report.format_line,
        "summary": report.summary("f.jsonl") if report.problems else None,
    }


@pytest.mark.parametrize(
    "first",
    [
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\n',
        b'{"text": "t"}\n',
        b"\n",
    ],
    ids=["chat", "prompt_completion_bom", "text", "blank"],
)
@pytest.mark.parametrize("max_line_bytes", [MAX_LINE_BYTES, 150])
def test_a_file_gets_the_same_report_with_and_without_the_fast_path(
    first: bytes, max_line_bytes: int
) -> None:
    for seed in range(3):
        lines = file_lines(1500, first, seed=SEED + seed)
        # MAX_PROBLEMS caps the problems listed: compare shorter files too, so that every problem is.
        for part in (lines, lines[:60], lines[::7][:80]):
            slow = report_of(part, fast=False, max_line_bytes=max_line_bytes)
            assert report_of(part, fast=True, max_line_bytes=max_line_bytes) == slow


@pytest.mark.parametrize(
    ("line", "code", "place"),
    [
        (b'{"text": "\\ud800"}', "invalid_unicode", '"text"'),
        (b'{"prompt": "p\\udc00", "completion": "c"}', "invalid_unicode", '"prompt"'),
        (
            b'{"messages": [{"role": "assistant", "content": "\\udfff\\ud83d"}]}',
            "invalid_unicode",
            "messages[0].content",
        ),
        (
            b'{"messages": [{"role": "assistant", "content": "y", "\\ud800": 1}]}',
            "invalid_unicode",
            "messages[0]",
        ),
        (b'{"\\ud800": "t"}', "invalid_unicode", "The record"),
        (b'{"text": "t", "x": 1e400}', "invalid_number", "1e400"),
        (b'{"text": "t", "x": -1E+999}', "invalid_number", "-1E+999"),
        (b'{"text": "t", "x": NaN}', "invalid_number", "NaN"),
        (b'{"text": "t", "x": Infinity}', "invalid_number", "Infinity"),
        (b'{"text": "t", "x": ' + b"9" * 5000 + b"}", "invalid_number", "too many digits"),
    ],
)
def test_text_that_is_not_unicode_and_numbers_no_float_holds_are_refused(
    line: bytes, code: str, place: str
) -> None:
    with pytest.raises(RecordError) as refused:
        load_line(line)
    assert refused.value.code == code and place in refused.value.message, refused.value.message
    # orjson refuses every one of them, so the fast path leaves them to the models.
    assert all(line_checker(name)(line) is None for name in FORMATS)
    # A pair of surrogates is one character, and an escaped backslash before "ud800" is no escape at all.
    assert load_line(b'{"text": "\\ud83d\\ude00 \\\\ud800"}') == {"text": "\U0001f600 \\ud800"}


def test_only_the_first_record_and_the_bad_lines_go_to_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = dataset_format.FORMATS[CHAT].model_validate

    def counted(obj: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("model")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(dataset_format.FORMATS[CHAT], "model_validate", counted)
    good = b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
    bad = b'{"messages": [{"role": "user", "content": "x"}]}\n'
    report = validate_lines([good] * 50 + [bad] + [good] * 50)
    assert len(calls) == 2
    assert report.examples == 100 and [(p.line, p.code) for p in report.problems] == [
        (51, "missing_assistant_turn")
    ]
    assert report.stats() == validate_lines([good] * 50 + [bad] + [good] * 50, fast=False).stats()
