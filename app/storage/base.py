"""The storage interface: blobs (datasets, checkpoints, resume states, adapters) addressed by keys.

Keys are relative paths such as `files/file-abc.jsonl`. A blob is written by receiving it into a local temp
file (`temp_path`), then `commit`ting it under its key in one step: a reader never sees half of one."""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

# What a download reads at a time, from either backend.
CHUNK_BYTES = 64 * 1024


class Storage(ABC):
    """Only the API process uses storage; workers and the inference server go through its internal routes."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def temp_path(self) -> Path:
        """A fresh local path to receive a blob into before `commit`."""
        return self.temp_dir / secrets.token_hex(16)

    @abstractmethod
    def commit(self, temp: Path, key: str) -> None:
        """Store a finished temp file under `key`, whole or not at all (a blob already there stays until
        the new one is complete). The temp file is gone afterwards either way."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The blob's size in bytes; FileNotFoundError when there is none."""

    @abstractmethod
    def read(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        """Bytes `start` to `stop` (exclusive) of the blob, in chunks, read as they are iterated."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; nothing happens when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def check(self) -> None:
        """Raise unless storage answers: the directory takes a write, the bucket a HeadBucket (/readyz)."""


def checked_key(key: str) -> str:
    """`key` when it is a plain relative path that stays under the storage root, else ValueError."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key:
        raise ValueError(f"storage key escapes the storage root: {key!r}")
    return path.as_posix()
