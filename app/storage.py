"""Blob storage for datasets, checkpoints and adapters: a local directory addressed by keys."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class Storage:
    """Keys are relative paths such as `files/file-abc.jsonl`; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def temp_path(self) -> Path:
        """A fresh path on the same filesystem, so `commit` is a rename."""
        return self.root / "tmp" / secrets.token_hex(16)

    def commit(self, temp: Path, key: str) -> Path:
        """Move a finished temp file to its key."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return final

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()
