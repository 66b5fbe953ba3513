"""A streaming multipart/form-data reader: the file part goes straight to a temp file while it is hashed.

FastAPI's `UploadFile` and `request.form()` spool the whole body before the route runs, so a 10 GB upload
would be on disk before any size check. This reader feeds `request.stream()` chunk by chunk to
python_multipart's `MultipartParser` and stops as soon as the file part passes the limit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Boundaries, part headers and text fields: everything in the body but the file itself. Text fields are
# held in memory, so they are bounded by this too.
FORM_OVERHEAD_BYTES = 64 * 1024
FILE_FIELD = "file"
# The body goes to the parsing thread in batches of about this size: with a hop to the thread and back for
# each chunk the server read, the hops took some 15% of the API process's time in a large upload.
BATCH_BYTES = 1024 * 1024
WRITE_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255
DEFAULT_FILENAME = "upload.jsonl"


@dataclass(frozen=True)
class ReceivedFile:
    """A file part, complete on disk at `path` (a storage temp path)."""

    path: Path
    filename: str
    bytes: int
    sha256: str


@dataclass
class ReceivedForm:
    """The text fields of a form and its one file part, if it had one."""

    fields: dict[str, str]
    file: ReceivedFile | None

    def discard(self) -> None:
        """Remove the temp file, if any; safe to call again, and after the file was moved away."""
        if self.file is not None:
            self.file.path.unlink(missing_ok=True)


async def receive_form(request: Request, temp_path: Path, *, max_file_bytes: int) -> ReceivedForm:
    """Stream a multipart body: the part named `file` to `temp_path`, other parts as text fields.
    A file part over `max_file_bytes` → 413 at once; on any failure no temp file is left behind."""
    boundary = _boundary(request.headers.get("content-type"))
    _check_declared_length(request.headers.get("content-length"), max_file_bytes)
    reader = _FormReader(boundary, temp_path, max_file_bytes)
    try:
        received = 0
        batch: list[bytes] = []
        async for chunk in request.stream():
            received += len(chunk)
            batch.append(chunk)
            # The body goes to the parser in batches, as each hop to a thread costs: a batch is handed over
            # when it is BATCH_BYTES, and every chunk outside the file part (text fields are held in memory)
            # or once the limit is passed, to stop right past either bound.
            if (
                received - reader.received_bytes >= BATCH_BYTES
                or received > max_file_bytes
                or not reader.in_file_part
            ):
                await _parse(reader, batch)
        await _parse(reader, batch)
        return reader.finish()
    except ClientDisconnect:
        reader.discard()
        raise InvalidRequest("The client disconnected during the upload", code="upload_incomplete") from None
    except BaseException:
        reader.discard()
        raise


async def _parse(reader: _FormReader, batch: list[bytes]) -> None:
    """Hand the batch to the reader in a worker thread (it hashes and writes to disk, which must not stall
    the event loop), and empty it; 413 when the form's fields besides the file outgrow their bound."""
    if not batch:
        return
    data = batch[0] if len(batch) == 1 else b"".join(batch)
    batch.clear()
    await run_in_threadpool(reader.write, data)
    if reader.received_bytes - reader.file_bytes > FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(
            f"The form fields besides the file exceed {FORM_OVERHEAD_BYTES} bytes", code="request_too_large"
        )


def _boundary(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMediaType("Send the upload as multipart/form-data with a boundary")
    return options[b"boundary"]


def _check_declared_length(content_length: str | None, max_file_bytes: int) -> None:
    """Refuse a body that announces itself as too large before reading any of it."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InvalidRequest("Invalid Content-Length header", code="invalid_content_length") from None
    if declared > max_file_bytes + FORM_OVERHEAD_BYTES:
        raise _file_too_large(max_file_bytes)


def _file_too_large(max_file_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The file is larger than the {max_file_bytes} byte limit of this server", param=FILE_FIELD
    )


class _FileSink:
    """Writes the file part to disk while counting its bytes and hashing it.

    It writes WRITE_BYTES at a time: here (Linux 6.18, ext4) a write() of 256 KiB or more into the page cache
    took two to three times the system time per byte of one of 128 KiB or less, and the megabyte batches
    the sink gets made writing the file the largest cost of an upload (`python -m bench upload`)."""

    def __init__(self, path: Path, filename: str, max_bytes: int) -> None:
        self.path, self.filename, self.max_bytes = path, filename, max_bytes
        self.bytes = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO = path.open("wb")

    def write(self, data: bytes | memoryview) -> None:
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise _file_too_large(self.max_bytes)
        self._digest.update(data)
        view = memoryview(data)
        for start in range(0, len(view), WRITE_BYTES):
            self._file.write(view[start : start + WRITE_BYTES])

    def close(self) -> ReceivedFile:
        self._file.close()
        return ReceivedFile(self.path, self.filename, self.bytes, self._digest.hexdigest())

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _FormReader:
    """MultipartParser callbacks that route each part: the file part to a `_FileSink`, others to `fields`."""

    def __init__(self, boundary: bytes, temp_path: Path, max_file_bytes: int) -> None:
        self.fields: dict[str, str] = {}
        self._temp_path, self._max_file_bytes = temp_path, max_file_bytes
        self._sink: _FileSink | None = None
        self._received: ReceivedFile | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_name, self._header_value = bytearray(), bytearray()
        self._part_name: str | None = None
        self._part_value = bytearray()
        self._ended = False
        self.received_bytes = 0  # of the body, parsed
        try:
            self._parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
                    "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                    "on_end": self._on_end,
                },
            )
        except FormParserError as error:
            raise InvalidRequest(f"Invalid multipart boundary: {error}", code="invalid_multipart") from None

    @property
    def file_bytes(self) -> int:
        return self._sink.bytes if self._sink else 0

    @property
    def in_file_part(self) -> bool:
        """True while the file part's data is being read (the parser is inside it, its end not yet seen)."""
        return self._part_name == FILE_FIELD and self._received is None

    def write(self, chunk: bytes) -> None:
        self.received_bytes += len(chunk)
        try:
            self._parser.write(chunk)
        except FormParserError as error:
            raise InvalidRequest(f"Malformed multipart body: {error}", code="invalid_multipart") from None

    def finish(self) -> ReceivedForm:
        if not self._ended:
            raise InvalidRequest(
                "The multipart body ended before its closing boundary", code="invalid_multipart"
            )
        return ReceivedForm(self.fields, self._received)

    def discard(self) -> None:
        if self._sink is not None:
            self._sink.discard()

    def _on_part_begin(self) -> None:
        self._headers.clear()
        self._part_name = None
        self._part_value.clear()

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._part_name = options[b"name"].decode("utf-8", "replace") if b"name" in options else None
        if self._part_name != FILE_FIELD:
            return
        if self._sink is not None:
            raise InvalidRequest("Send exactly one file per upload", param=FILE_FIELD)
        filename = _clean_filename(options.get(b"filename"))
        self._sink = _FileSink(self._temp_path, filename, self._max_file_bytes)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == FILE_FIELD and self._sink is not None:  # set when the file part began
            self._sink.write(memoryview(data)[start:end])  # not a copy of each megabyte
        elif self._part_name is not None:
            self._part_value.extend(data[start:end])

    def _on_part_end(self) -> None:
        if self._part_name == FILE_FIELD and self._sink is not None:
            self._received = self._sink.close()
        elif self._part_name is not None:
            try:
                self.fields[self._part_name] = self._part_value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest("Form fields must be UTF-8 text", param=self._part_name) from None

    def _on_end(self) -> None:
        self._ended = True


def _clean_filename(raw: bytes | None) -> str:
    """The client's file name without any directory part (browsers on Windows send full paths)."""
    # parse_options_header round-trips the header bytes through latin-1; clients send UTF-8 names.
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            f"The file name is longer than {MAX_FILENAME_CHARS} characters", param=FILE_FIELD
        )
    return name or DEFAULT_FILENAME
