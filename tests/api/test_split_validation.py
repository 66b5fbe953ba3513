"""A large upload validated in two processes (app.files.split_validation): the report is the one a single
pass makes, wherever the file is cut; a file in more than one format is validated in one pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import orjson
import psutil
import pytest

from app.files import split_validation
from app.files.split_validation import _joined, _line_start_at_or_after, _validate_range, validate_path
from app.files.validation import MAX_PROBLEMS, check_not_empty
from tests.api.test_format_fast_path import ODD_LINES, mutated, records

BOM = b"\xef\xbb\xbf"
CHAT_LINE = b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'


def one_pass(path: Path):
    return check_not_empty(_validate_range(path, 0, path.stat().st_size))


def joined_at(path: Path, cut: int):
    return _joined(_validate_range(path, 0, cut), _validate_range(path, cut, path.stat().st_size))


def line_starts(data: bytes) -> list[int]:
    return [0] + [i + 1 for i, byte in enumerate(data) if byte == 0x0A and i + 1 < len(data)]


def generated(path: Path, seed: int, *, one_format: bool) -> Path:
    """Records (some mutated), the fast path's odd lines, blank lines and a BOM mid-file: chat records and
    lines in no format when `one_format`, else records of every format too."""
    import random

    rng = random.Random(seed)
    lines = [BOM + CHAT_LINE]
    for record in records(120, seed=seed):
        if one_format and "messages" not in record:
            continue
        line = orjson.dumps(record) + b"\n"
        lines.append(mutated(rng, line) if rng.random() < 0.3 else line)
    odd = [line for line in ODD_LINES if not (one_format and (b'"text"' in line or b'"prompt"' in line))]
    lines += odd + [b"\n", BOM + CHAT_LINE, b"not json\n"]
    rng.shuffle(lines)
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("one_format", [True, False])
def test_cut_at_any_line_the_joined_report_is_the_one_pass_report(
    tmp_path: Path, seed: int, one_format: bool
) -> None:
    path = generated(tmp_path / "mixed.jsonl", seed, one_format=one_format)
    expected = one_pass(path)
    assert expected.problem_count > 0 and expected.examples > 0
    cuts = line_starts(path.read_bytes())[1:]
    joined = [(cut, joined_at(path, cut)) for cut in cuts]
    if one_format:
        assert all(report is not None for _, report in joined)
    for cut, report in joined:
        if report is None:  # a file in more than one format: validated again in one pass
            assert any(p.code == "format_mismatch" for p in expected.problems)
            continue
        assert check_not_empty(report) == expected, f"cut at byte {cut}"


def test_problems_past_the_listed_hundred_and_line_numbers_carry_over_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(CHAT_LINE + b"oops\n" * 150 + CHAT_LINE * 10 + b"{\n" * 70)
    expected = one_pass(path)
    assert expected.problem_count == 220 and len(expected.problems) == MAX_PROBLEMS
    for cut in line_starts(path.read_bytes())[1::7]:
        assert check_not_empty(joined_at(path, cut)) == expected


def test_an_empty_part_or_a_blank_file(tmp_path: Path) -> None:
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n\n   \n")
    assert [p.code for p in validate_path(blank, 6, split_min_bytes=0).problems] == ["empty_file"]
    assert _line_start_at_or_after(blank, 2) == 2 and _line_start_at_or_after(blank, 3) == 6
    assert _line_start_at_or_after(blank, 0) == 0


@pytest.fixture
def second(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """A second process of the test's own; the list of what was handed to it (None: validated in one pass)."""
    process = split_validation._SecondProcess()
    handed: list = []
    submit = process.submit

    def counted(*call):
        handed.append(future := submit(*call))
        return future

    monkeypatch.setattr(process, "submit", counted)
    monkeypatch.setattr(split_validation, "_SECOND", process)
    yield handed
    if process._pool is not None:
        process._pool.shutdown()


def the_process(second: list) -> psutil.Process:
    [child] = split_validation._SECOND._pool._processes.values()
    return psutil.Process(child.pid)


def large_chat_file(tmp_path: Path) -> Path:
    path = generated(tmp_path / "chat.jsonl", 4, one_format=True)
    path.write_bytes(path.read_bytes() + CHAT_LINE * 2000)  # the second part: chat records, the file's format
    return path


def test_a_large_file_is_validated_by_a_second_process_with_the_one_pass_report(
    tmp_path: Path, second
) -> None:
    path = large_chat_file(tmp_path)
    expected = one_pass(path)
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected
    assert len(second) == 1 and second[0] is not None and the_process(second).is_running()


def test_a_second_process_that_died_or_was_interrupted_leaves_the_file_to_one_pass(
    tmp_path: Path, second
) -> None:
    path = large_chat_file(tmp_path)
    expected = one_pass(path)
    split_validation.warm_up()
    split_validation._SECOND.start().submit(int).result()  # started
    dead = the_process(second)
    dead.send_signal(signal.SIGINT)  # Ctrl-C in the API's terminal reaches it too: ignored
    time.sleep(0.5)
    assert dead.is_running()
    dead.kill()
    dead.wait(10)
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected  # in one pass
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected  # a new process
    assert second[-1] is not None and the_process(second).pid != dead.pid

    # The process dies during a second part.
    process = split_validation._SECOND
    submit = process.submit
    process.submit = lambda *call: submit(os._exit, 1)  # type: ignore[method-assign]
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected
    assert isinstance(second[-1].exception(), BrokenProcessPool)
    process.submit = submit  # type: ignore[method-assign]
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected  # dropped, in one pass
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected  # a new process
    assert second[-1] is not None and second[-1].exception() is None


def test_while_the_second_process_is_busy_another_file_is_validated_in_one_pass(
    tmp_path: Path, second
) -> None:
    path = large_chat_file(tmp_path)
    expected = one_pass(path)
    busy = split_validation._SECOND.submit(time.sleep, 2)
    assert busy is not None
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected
    assert second[-1] is None  # not handed over: it would have waited
    busy.result()


def test_the_second_process_ends_with_a_killed_api_process() -> None:
    code = (
        "import os, signal\n"
        "from app.files import split_validation\n"
        "pool = split_validation._SECOND.start()\n"
        "pool.submit(int).result()\n"
        "[child] = pool._processes.values()\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    child = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the second process outlived the API process"
        time.sleep(0.1)


def test_parts_in_different_formats_are_validated_in_one_pass(tmp_path: Path, second) -> None:
    path = tmp_path / "two-formats.jsonl"
    path.write_bytes(CHAT_LINE * 100 + b'{"text": "t"}\n' * 400)
    expected = one_pass(path)
    assert expected.problem_count == 400 and expected.problems[0].code == "format_mismatch"
    assert validate_path(path, path.stat().st_size, split_min_bytes=0) == expected
    assert second[0] is not None  # validated again in one pass once the parts were seen


def test_an_upload_validated_in_two_processes_names_its_bad_lines_as_one_pass_would(
    client, auth, monkeypatch: pytest.MonkeyPatch, second
) -> None:
    monkeypatch.setattr(split_validation, "SPLIT_MIN_BYTES", 0)
    content = CHAT_LINE * 300 + b"oops\n" + CHAT_LINE * 300 + b'{"text": "t"}\n' + CHAT_LINE * 100
    files = {"file": ("big.jsonl", content)}
    refused = client.post("/v1/files", headers=auth, files=files, data={"purpose": "fine-tune"})
    assert refused.status_code == 422, refused.text
    assert [(d["line"], d["code"]) for d in refused.json()["error"]["details"]] == [
        (301, "invalid_json"),
        (602, "format_mismatch"),
    ]
    ok = {"file": ("ok.jsonl", CHAT_LINE * 700)}
    accepted = client.post("/v1/files", headers=auth, files=ok, data={"purpose": "fine-tune"})
    assert accepted.status_code == 200 and accepted.json()["stats"]["examples"] == 700
    assert len(second) == 2 and all(second)  # both second parts went to the second process
