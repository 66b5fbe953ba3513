"""The `phitune` command line, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from phitune.launch import REPO, phitune_command


def phitune(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(data_dir)
    }
    return subprocess.run(
        phitune_command(*args),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_need_a_migrated_database_and_print_the_key_last(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    refused = phitune(data_dir, "keys", "create", "--tenant", "acme")
    assert refused.returncode == 1 and "run `phitune migrate` first" in refused.stderr
    assert phitune(data_dir, "migrate").returncode == 0
    created = phitune(data_dir, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("pt-") and len(key) > 40
