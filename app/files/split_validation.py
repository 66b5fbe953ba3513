"""A large upload validated in two processes: the validator holds the GIL, and the API process receives and
validates in turn, so one core was the whole upload's speed (`python -m bench upload`).

The file is cut at a line start; a process of its own validates the second part while the API's thread
validates the first, and the two reports are joined as if the file had been validated in one pass: the second
part's line numbers shifted by the first part's line count, its problems after the first part's. Where the
join would change an answer (a file in more than one format) or no second process can be had, the file is
validated in one pass.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from threading import Lock

from app.files.validation import (
    FORMAT_MISMATCH,
    MAX_PROBLEMS,
    Problem,
    Report,
    check_not_empty,
    read_lines,
    validate_part,
)

log = logging.getLogger(__name__)

SPLIT_MIN_BYTES = 64 * 1024 * 1024  # below this, a second process costs more than it saves
# The second part's share: the API's thread has also received the body (about 40 % of an upload's CPU time).
# Measured with `bench upload` on 2 cores: 0.6 → 151–158 MB/s, 0.7 → 159–190, 0.8 → 150–153.
SECOND_PART_SHARE = 0.7
READ_BUFFER_BYTES = 1024 * 1024  # a few lines per read() would spend more in system calls than in parsing

_pool: ProcessPoolExecutor | None = None
_pool_lock = Lock()


def validate_path(path: Path, size: int, *, split_min_bytes: int | None = None) -> Report:
    """The report of the file at `path` (`size` bytes), from two processes when it is large enough
    (`split_min_bytes`, by default SPLIT_MIN_BYTES)."""
    large = size >= (SPLIT_MIN_BYTES if split_min_bytes is None else split_min_bytes)
    cut = _line_start_at_or_after(path, int(size * (1 - SECOND_PART_SHARE))) if large else 0
    if not 0 < cut < size:
        return check_not_empty(_validate_range(path, 0, size))
    try:
        second: Future[Report] = _validator().submit(_validate_range, path, cut, size)
    except (BrokenProcessPool, RuntimeError, OSError) as error:  # the pool is gone, or cannot start one
        log.warning("validating %s in one process: %s", path.name, error)
        _forget_pool()
        return check_not_empty(_validate_range(path, 0, size))
    first = _validate_range(path, 0, cut)
    try:
        joined = _joined(first, second.result())
    except BrokenProcessPool as error:  # the process died (killed, out of memory)
        log.warning("validating %s in one process: %s", path.name, error)
        _forget_pool()
        joined = None
    return check_not_empty(joined or _validate_range(path, 0, size))


def warm_up() -> None:
    """Start the second process now (it takes about a second), e.g. while a large upload arrives."""
    try:
        _validator().submit(int)
    except (BrokenProcessPool, RuntimeError, OSError) as error:
        log.warning("no second validating process: %s", error)
        _forget_pool()


def _validate_range(path: Path, start: int, end: int) -> Report:
    with path.open("rb", buffering=READ_BUFFER_BYTES) as stream:
        stream.seek(start)
        return validate_part(read_lines(stream, limit=end - start), at_start=start == 0)


def _line_start_at_or_after(path: Path, offset: int) -> int:
    """The offset of the first line starting at or after `offset` (the file's size if there is none)."""
    if offset == 0:
        return 0
    with path.open("rb", buffering=READ_BUFFER_BYTES) as stream:
        stream.seek(offset - 1)
        skipped = 0
        while chunk := stream.read(READ_BUFFER_BYTES):
            if (newline := chunk.find(b"\n")) >= 0:
                return offset - 1 + skipped + newline + 1
            skipped += len(chunk)
        return offset - 1 + skipped


def _joined(first: Report, second: Report) -> Report | None:
    """The report of the two parts as one pass would make it; None where one pass would differ: the parts
    found different formats, or the second part reported lines as not in the format it found (its messages
    name the line it found it on, which one pass finds elsewhere). Either is a refused file."""
    if first.format and second.format and first.format != second.format:
        return None
    if any(problem.code == FORMAT_MISMATCH for problem in second.problems):
        return None
    shift = first.lines
    joined = Report(
        format=first.format or second.format,
        format_line=first.format_line or (second.format_line and second.format_line + shift),
        examples=first.examples + second.examples,
        messages=first.messages + second.messages,
        assistant_turns=first.assistant_turns + second.assistant_turns,
        characters=first.characters + second.characters,
        max_example_characters=max(first.max_example_characters, second.max_example_characters),
        lines=first.lines + second.lines,
    )
    shifted = [
        Problem(problem.line and problem.line + shift, problem.code, problem.message)
        for problem in second.problems
    ]
    joined.problems = (first.problems + shifted)[:MAX_PROBLEMS]
    joined.problem_count = first.problem_count + second.problem_count
    return joined


def _validator() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Spawned, not forked: the API process has threads (and an event loop) a fork would copy mid-use.
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _forget_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
