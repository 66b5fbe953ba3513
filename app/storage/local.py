"""Storage in a local directory (the default: `storage/` under the data dir)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from app.storage.base import CHUNK_BYTES, Storage, checked_key


class LocalStorage(Storage):
    """Writes are atomic: the temp files live under the same root, so `commit` is a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(root / "tmp")

    def path(self, key: str) -> Path:
        path = (self.root / checked_key(key)).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def commit(self, temp: Path, key: str) -> None:
        try:
            final = self.path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path.stat().st_size

    def read(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        with self.path(key).open("rb") as blob:
            blob.seek(start)
            while start < stop:
                chunk = blob.read(min(CHUNK_BYTES, stop - start))
                if not chunk:
                    raise OSError(f"storage blob {key!r} ended before byte {stop}")
                start += len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def check(self) -> None:
        probe = self.temp_path()
        probe.write_bytes(b"ok")
        probe.unlink()
