"""The JSONL dataset validator: pure functions over lines of bytes, no web framework, no storage.

One JSON object per line, blank lines ignored, one format per file (detected from the first record):

    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": "...", ...}, ...]}
    prompt_completion   {"prompt": "...", "completion": "..."}
    text                {"text": "..."}

Decisions beyond the API contract:
- Unknown keys are errors, at the top level and in messages, because the trainer would silently drop them
  (a typo such as "mesages" or "contents" would otherwise train on nothing).
- A message may carry `name` (a string) so that OpenAI-format datasets load unchanged; Phi-3's chat template
  does not render it.
- `weight` (0 or 1) is allowed only on assistant messages; a chat example needs at least one assistant
  message with weight 1 (the default), otherwise it has nothing to train on.
- `completion` and `text` must not be empty, for the same reason; other strings may be empty.
- A UTF-8 byte order mark is accepted at the start of the file (Windows editors write one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAX_PROBLEMS = 100
MAX_LINE_BYTES = 8 * 1024 * 1024  # a generous bound on one example, so one line never exhausts memory

CHAT, PROMPT_COMPLETION, TEXT = "chat", "prompt_completion", "text"
FORMAT_KEYS = {CHAT: {"messages"}, PROMPT_COMPLETION: {"prompt", "completion"}, TEXT: {"text"}}
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}


@dataclass(frozen=True)
class Problem:
    """Why one line of the file is rejected."""

    line: int | None  # None for problems of the whole file
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


class LineError(Exception):
    """Raised by the per-line checks; becomes a `Problem` for that line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Report:
    """What validation found: statistics of the valid records and the first `MAX_PROBLEMS` problems."""

    format: str | None = None
    format_line: int | None = None
    examples: int = 0
    messages: int = 0
    assistant_turns: int = 0
    characters: int = 0
    max_example_characters: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add_problem(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def stats(self) -> dict[str, Any]:
        """The file's `stats` object; message counts are null except for chat files."""
        chat = self.format == CHAT
        return {
            "examples": self.examples,
            "format": self.format,
            "messages": self.messages if chat else None,
            "assistant_turns": self.assistant_turns if chat else None,
            "characters": self.characters,
            "max_example_characters": self.max_example_characters,
        }

    def summary(self, filename: str) -> str:
        """One sentence for the error message, e.g. `3 problems in train.jsonl; first on line 2: ...`."""
        first = self.problems[0]
        listed = f" (first {len(self.problems)} listed)" if self.problem_count > len(self.problems) else ""
        noun = "problem" if self.problem_count == 1 else "problems"
        where = f"on line {first.line}" if first.line is not None else "in the file"
        return f"{self.problem_count} {noun} in {filename}{listed}; first {where}: {first.message}"


def read_lines(stream: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a binary stream, each cut to at most `max_line_bytes + 1` bytes (the rest is skipped),
    so that an overlong line is detectable without holding it in memory."""
    while line := stream.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := stream.readline(max_line_bytes)) and not rest.endswith(b"\n"):
                pass
        yield line


def validate_lines(lines: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Report:
    """Check every line (numbered from 1) and gather statistics; a line reports at most one problem."""
    report = Report()
    for number, raw in enumerate(lines, start=1):
        try:
            record = _parse_line(raw, number, max_line_bytes)
            if record is None:
                continue
            line_format = detect_format(record)
            if report.format is None:
                report.format, report.format_line = line_format, number
            elif line_format != report.format:
                raise LineError(
                    "format_mismatch",
                    f"This line is in {line_format} format but the file is in {report.format} format "
                    f"(detected on line {report.format_line}); use one format per file",
                )
            _count(report, record, line_format)
        except LineError as error:
            report.add_problem(Problem(number, error.code, error.message))
    if report.examples == 0 and report.ok:
        report.add_problem(Problem(None, "empty_file", "The file has no examples (it is empty or blank)"))
    return report


def _parse_line(raw: bytes, number: int, max_line_bytes: int) -> dict[str, Any] | None:
    """The JSON object on one line, or None for a blank line."""
    if len(raw) > max_line_bytes:
        raise LineError("line_too_long", f"The line is longer than {max_line_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise LineError("invalid_utf8", f"Not valid UTF-8 (byte {error.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise LineError("invalid_json", f"Invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise LineError("invalid_json", "Invalid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise LineError("not_an_object", f"Expected a JSON object, got {_json_type(record)}")
    return record


def detect_format(record: dict[str, Any]) -> str:
    """The format a record is written in, judged by its keys; LineError when it matches none."""
    for name, keys in FORMAT_KEYS.items():
        if keys & record.keys():
            return name
    raise LineError(
        "unknown_format",
        f'Expected "messages" (chat), "prompt" and "completion", or "text"; found keys {sorted(record)}',
    )


def _count(report: Report, record: dict[str, Any], record_format: str) -> None:
    """Check a record in its format and add it to the statistics."""
    _reject_unknown_keys(record, FORMAT_KEYS[record_format], "record")
    if record_format == CHAT:
        characters, assistant_turns = check_chat(record)
        report.messages += len(record["messages"])
        report.assistant_turns += assistant_turns
    elif record_format == PROMPT_COMPLETION:
        characters = check_prompt_completion(record)
    else:
        characters = check_text(record)
    report.examples += 1
    report.characters += characters
    report.max_example_characters = max(report.max_example_characters, characters)


def check_chat(record: dict[str, Any]) -> tuple[int, int]:
    """Check a chat record; returns (characters of content, assistant turns trained on)."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_messages", '"messages" must be a non-empty list of message objects')
    characters = trained = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise LineError("invalid_message", f"{where} must be an object, got {_json_type(message)}")
        _reject_unknown_keys(message, MESSAGE_KEYS, where)
        role = message.get("role")
        if role not in ROLES:
            raise LineError(
                "invalid_role", f"{where}.role must be one of {', '.join(ROLES)}; {_found(message, 'role')}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise LineError(
                "invalid_content", f"{where}.content must be a string; {_found(message, 'content')}"
            )
        if "name" in message and not isinstance(message["name"], str):
            raise LineError("invalid_name", f"{where}.name must be a string")
        weight = message.get("weight", 1)
        if "weight" in message and role != "assistant":
            raise LineError("invalid_weight", f"{where}.weight is only allowed on assistant messages")
        if weight not in (0, 1) or isinstance(weight, bool):
            raise LineError("invalid_weight", f"{where}.weight must be 0 or 1, got {weight!r}")
        characters += len(content)
        if role == "assistant" and weight == 1:
            trained += 1
    if not trained:
        raise LineError(
            "missing_assistant_turn", "The conversation needs at least one assistant message (with weight 1)"
        )
    return characters, trained


def check_prompt_completion(record: dict[str, Any]) -> int:
    """Check a prompt/completion record; returns its characters."""
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise LineError(f"invalid_{key}", f'"{key}" must be a string; {_found(record, key)}')
    if not record["completion"]:
        raise LineError("invalid_completion", '"completion" must not be empty')
    return len(record["prompt"]) + len(record["completion"])


def check_text(record: dict[str, Any]) -> int:
    """Check a text record; returns its characters."""
    text = record["text"]
    if not isinstance(text, str) or not text:
        raise LineError("invalid_text", '"text" must be a non-empty string')
    return len(text)


def _reject_unknown_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(obj.keys() - allowed)
    if unknown:
        raise LineError("unknown_key", f"Unknown key {unknown[0]!r} in {where}; allowed: {sorted(allowed)}")


def _found(obj: dict[str, Any], key: str) -> str:
    """What a record holds under `key`, for messages: `it is missing` or `got a number`."""
    if key not in obj:
        return "it is missing"
    value = obj[key]
    return f"got {value[:40]!r}" if isinstance(value, str) else f"got {_json_type(value)}"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")
