"""The JSONL dataset validator: pure functions over lines of bytes, no web framework, no storage.

What a line may hold is `app.dataset_format`'s (the worker reads the file with the same models); this module
numbers the lines, bounds their length, keeps one format per file (detected from the first record), reports
at most one problem per line and gathers the file's statistics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from app.dataset_format import (
    CHAT,
    ChatRecord,
    Record,
    RecordError,
    RecordStats,
    detect_format,
    line_checker,
    load_line,
    validate_record,
)

MAX_PROBLEMS = 100
FORMAT_MISMATCH = "format_mismatch"  # a line in another format than the file's first record
MAX_LINE_BYTES = 8 * 1024 * 1024  # a generous bound on one example, so one line never exhausts memory


@dataclass(frozen=True)
class Problem:
    """Why one line of the file is rejected."""

    line: int | None  # None for problems of the whole file
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


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
    lines: int = 0  # read, valid or not

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


def read_lines(
    stream: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES, *, limit: int = sys.maxsize
) -> Iterator[bytes]:
    """The lines of a binary stream (of its next `limit` bytes), each cut to at most `max_line_bytes + 1`
    bytes (the rest is skipped), so that an overlong line is detectable without holding it in memory."""
    while limit > 0 and (line := stream.readline(min(max_line_bytes + 1, limit))):
        limit -= len(line)
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while limit > 0 and (rest := stream.readline(min(max_line_bytes, limit))):
                limit -= len(rest)
                if rest.endswith(b"\n"):
                    break
        yield line


def validate_lines(
    lines: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES, *, fast: bool = True
) -> Report:
    """Check every line (numbered from 1) and gather statistics; a line reports at most one problem.

    Once the file's format is known, a line goes first to the format's `line_checker` (orjson and plain
    checks, several times faster); only a line it does not pass as valid goes through `load_line` and the
    record models, which tell what is wrong with it. `fast=False` sends every line to the models (the
    tests compare both ways)."""
    return check_not_empty(validate_part(lines, max_line_bytes, fast=fast, at_start=True))


def check_not_empty(report: Report) -> Report:
    """The whole file's report: a file without examples and without other problems is `empty_file`."""
    if report.examples == 0 and report.ok:
        report.add_problem(Problem(None, "empty_file", "The file has no examples (it is empty or blank)"))
    return report


def validate_part(
    lines: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES, *, fast: bool = True, at_start: bool
) -> Report:
    """`validate_lines` of a part of a file, its lines numbered from 1 (only a part `at_start` may begin
    with a byte-order mark); the whole file's report is `check_not_empty`'s."""
    report = Report()
    check: Callable[[bytes], RecordStats | None] | None = None
    # The fast path's lines are counted here and added to the report's at the end (fewer lookups a line).
    examples = messages = trained = characters = longest = number = 0
    for number, raw in enumerate(lines, start=1):
        if check is not None and len(raw) <= max_line_bytes and (stats := check(raw)) is not None:
            examples += 1
            messages += stats[0]
            trained += stats[1]
            characters += stats[2]
            if stats[2] > longest:
                longest = stats[2]
            continue
        _validate_line(report, number, raw, max_line_bytes, first=at_start and number == 1)
        if fast and check is None and report.format is not None:
            check = line_checker(report.format)
    report.lines = number
    report.examples += examples
    report.messages += messages
    report.assistant_turns += trained
    report.characters += characters
    report.max_example_characters = max(report.max_example_characters, longest)
    return report


def _validate_line(report: Report, number: int, raw: bytes, max_line_bytes: int, *, first: bool) -> None:
    """One line through the record models: counted when valid, else its problem added."""
    try:
        if len(raw) > max_line_bytes:
            raise RecordError("line_too_long", f"The line is longer than {max_line_bytes} bytes")
        obj = load_line(raw, first=first)
        if obj is None:
            return
        line_format = detect_format(obj)
        if report.format is None:
            report.format, report.format_line = line_format, number
        elif line_format != report.format:
            raise RecordError(
                FORMAT_MISMATCH,
                f"This line is in {line_format} format but the file is in {report.format} format "
                f"(detected on line {report.format_line}); use one format per file",
            )
        _count(report, validate_record(obj, line_format))
    except RecordError as error:
        report.add_problem(Problem(number, error.code, error.message))


def _count(report: Report, record: Record) -> None:
    """Add a valid record to the statistics."""
    if isinstance(record, ChatRecord):
        report.messages += len(record.messages)
        report.assistant_turns += record.trained_turns
    report.examples += 1
    report.characters += record.characters
    report.max_example_characters = max(report.max_example_characters, record.characters)
