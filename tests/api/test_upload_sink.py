"""The upload's file sink writes a batch in pieces of WRITE_BYTES: the file must hold exactly the data."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from app.files.upload import WRITE_BYTES, _FileSink


def test_the_file_holds_exactly_the_data_written_in_pieces(tmp_path: Path) -> None:
    rng = random.Random(7)
    sizes = [1, WRITE_BYTES - 1, WRITE_BYTES, WRITE_BYTES + 1, 3 * WRITE_BYTES + 17, 1_048_576, 0, 5]
    data = [rng.randbytes(size) for size in sizes]
    sink = _FileSink(tmp_path / "upload", "train.jsonl", max_bytes=10**9)
    for index, piece in enumerate(data):
        sink.write(piece if index % 2 else memoryview(b"<" + piece + b">")[1:-1])
    received = sink.close()
    content = b"".join(data)
    assert received.path.read_bytes() == content
    assert (received.bytes, received.sha256) == (len(content), hashlib.sha256(content).hexdigest())
