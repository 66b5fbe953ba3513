"""The upload benchmark (`python -m bench upload`): its data, and a smoke run on a small file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.files.service import ReceivedFile, validate_file
from bench.upload import generate
from phitune.launch import REPO


def test_the_data_is_deterministic_valid_chat(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = generate(first, 2_000_000)
    assert generate(second, 2_000_000) == rows
    assert first.read_bytes() == second.read_bytes()
    report = validate_file(ReceivedFile(first, first.name, first.stat().st_size, ""))
    assert report.ok and report.examples == rows and report.format == "chat"
    content = first.read_bytes()
    assert b'"role": "system"' in content and b'"weight": 0' in content and "日本".encode() in content


def test_a_small_run_prints_its_figures() -> None:
    env = {**os.environ, "BENCH_UPLOAD_MB": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "upload"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["file_mb"] >= 3 and result["rows"] > 1000
    for figure in ("upload_mb_s", "validate_mb_s", "receive_mb_s", "api_cpu_seconds"):
        assert result[figure] > 0, figure
    assert 0 <= result["api_rss_growth_mb"] < 100
