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
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from threading import Lock
from typing import Any

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


def validate_path(path: Path, size: int, *, split_min_bytes: int | None = None) -> Report:
    """The report of the file at `path` (`size` bytes), from two processes when it is large enough
    (`split_min_bytes`, by default SPLIT_MIN_BYTES) and the second process is free."""
    large = size >= (SPLIT_MIN_BYTES if split_min_bytes is None else split_min_bytes)
    cut = _line_start_at_or_after(path, int(size * (1 - SECOND_PART_SHARE))) if large else 0
    second = _SECOND.submit(_validate_range, path, cut, size) if 0 < cut < size else None
    if second is None:
        return check_not_empty(_validate_range(path, 0, size))
    first = _validate_range(path, 0, cut)
    try:
        joined = _joined(first, second.result())
    except (Exception, KeyboardInterrupt) as error:  # the process died (the next submit replaces it)
        log.warning("validating %s again in one process: %r", path.name, error)
        joined = None
    return check_not_empty(joined or _validate_range(path, 0, size))


def warm_up() -> None:
    """Start the second process now (it takes about a second), e.g. while a large upload arrives."""
    _SECOND.start()


class _SecondProcess:
    """One spawned process that validates second parts, one at a time: while it is busy, another upload is
    validated in one pass rather than wait behind it (a large bad file can take minutes)."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = False

    def start(self) -> ProcessPoolExecutor | None:
        with self._lock:
            return self._started()

    def submit(self, *call: Any) -> Future[Report] | None:
        """The call's future in the second process; None when it is busy or cannot be had."""
        with self._lock:
            if self._busy or (pool := self._started()) is None:
                return None
            try:
                future = pool.submit(*call)
            except (BrokenProcessPool, RuntimeError) as error:  # it died, idle or during a part
                log.warning("no second validating process: %r", error)
                self._drop(pool)
                return None
            self._busy = True
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future) -> None:
        with self._lock:
            self._busy = False

    def _started(self) -> ProcessPoolExecutor | None:
        if self._pool is None:
            try:
                # Spawned, not forked: the API process has threads (and an event loop) a fork would copy.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_second_process_start)
                self._pool.submit(int)  # starts the process now
            except (OSError, RuntimeError) as error:
                log.warning("no second validating process: %r", error)
                self._pool = None
        return self._pool

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:  # not a newer one, started since
            self._pool = None
            pool.shutdown(wait=False)


_SECOND = _SecondProcess()


def _second_process_start() -> None:
    """In the second process: Ctrl-C is the API's to handle, and the process ends with the API's, even a
    SIGKILLed one (it holds both ends of its call queue, so it would never read an end of file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if (parent := multiprocessing.parent_process()) is not None:
        threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()


def _exit_after(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


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
