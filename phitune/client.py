"""The HTTP client of the `phitune` CLI: requests to a phitune API, its errors, its server-sent events.

Plain httpx and JSON, no server import: the CLI of a base install talks to any phitune server over HTTP.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# A live event stream sends a keep-alive comment every 15 s (app.jobs.event_stream), so a read that waits
# much longer means the server is gone; a chat stream waits no longer between tokens than this either.
READ_TIMEOUT_SECONDS = 120
# The longest line of an event stream read: a server (or something posing as one) sending an endless line
# ends the command with an error rather than filling this machine's memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


class ApiError(Exception):
    """An error the server answered with (OpenAI's shape), a server that could not be reached or answered
    something that is not phitune's (a proxy's HTML page), or a download that would overwrite a file."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param
        self.details = details or []

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        """The error of a failed response: its `{"error": {…}}` body, else its status and text."""
        try:
            error = response.json()["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()[:200]
            return cls(
                f"HTTP {response.status_code}{': ' + text if text else ''}", status=response.status_code
            )
        return cls(
            message,
            status=response.status_code,
            code=error.get("code"),
            param=error.get("param"),
            details=error.get("details"),
        )


def bounded_lines(chunks: Iterator[str], limit: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines of a text stream (ended by \\n or \\r\\n), each at most `limit` characters: a longer one
    raises ApiError rather than being held in memory whole."""
    parts: list[str] = []  # the line read so far
    size = 0
    for chunk in chunks:
        *ends, rest = chunk.split("\n")
        for end in ends:
            line = "".join([*parts, end])
            if len(line) > limit:
                raise _too_long(limit)
            parts, size = [], 0
            yield line.removesuffix("\r")
        parts.append(rest)
        size += len(rest)
        if size > limit:
            raise _too_long(limit)
    if size:
        yield "".join(parts).removesuffix("\r")


def _too_long(limit: int) -> ApiError:
    return ApiError(f"the server sent a line of more than {limit:,} characters; stopped reading it")


def server_sent_events(lines: Iterator[str]) -> Iterator[str]:
    """The data of each event of a text/event-stream (a block ended by a blank line); comments (keep-alives),
    event names and ids skipped: phitune's streams say everything in their data."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def json_object(text: str) -> dict[str, Any]:
    """The JSON object an event's data holds ({} if it holds other JSON); ApiError if it is not JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ApiError(f"the server sent an event that is not JSON: {text[:200]!r}") from None
    return value if isinstance(value, dict) else {}


class Client:
    """One phitune server, with one bearer key (a tenant's API key, or the admin key for /v1/admin)."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.rstrip("/")
        # What messages name: the URL without any user:password in it.
        self.shown_url = str(httpx.URL(self.base_url).copy_with(username=None, password=None))
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=READ_TIMEOUT_SECONDS),
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful response; ApiError otherwise."""
        response = self._send(method, path, **kwargs)
        if response.is_error:
            raise ApiError.of(response)
        try:
            return response.json()
        except ValueError:  # a proxy's or another server's page, answered with a 2xx
            kind = response.headers.get("content-type", "no content type")
            raise ApiError(
                f"{self.shown_url} answered HTTP {response.status_code} with {kind}, not phitune's JSON: "
                "is --base-url (PHITUNE_BASE_URL) a phitune API?",
                status=response.status_code,
            ) from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, path: Path, purpose: str) -> Any:
        """POST /v1/files; httpx streams the file in chunks rather than reading it whole."""
        with path.open("rb") as body:
            return self.request(
                "POST", "/v1/files", files={"file": (path.name, body)}, data={"purpose": purpose}
            )

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response read as it arrives; ApiError (with the server's message) if it is an error."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.of(response)
                yield response
        except httpx.HTTPError as problem:
            raise self._unreachable(problem) from None

    def events(self, method: str, path: str, **kwargs: Any) -> Iterator[str]:
        """The data of each server-sent event of a streamed response, as it arrives."""
        with self.stream(method, path, **kwargs) as response:
            yield from server_sent_events(bounded_lines(response.iter_text()))

    def download(
        self, path: str, destination: Path, *, default_name: str, overwrite: bool = False, **params: Any
    ) -> tuple[Path, int]:
        """Stream a file response to `destination`, or into it when it is a directory, under the name the
        server gives (reduced to a plain file name in it, else `default_name`). An existing file is replaced
        only with `overwrite`. Written to a temporary file beside it first, so an interrupted or refused
        download (Ctrl-C included) leaves nothing behind and the file it would replace untouched."""
        with self.stream("GET", path, params={k: v for k, v in params.items() if v is not None}) as response:
            target = destination
            if destination.is_dir():
                target = destination / (_attachment_name(response) or default_name)
            _check_writable(target, overwrite)
            try:
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            except OSError as problem:
                raise ApiError(f"cannot write in {target.parent}: {problem.strerror or problem}") from None
            partial = Path(name)
            size = 0
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
                _check_writable(target, overwrite)  # a file made there while this one downloaded
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        return target, size

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as problem:
            raise self._unreachable(problem) from None

    def _unreachable(self, problem: httpx.HTTPError) -> ApiError:
        return ApiError(f"cannot reach phitune at {self.shown_url}: {problem or type(problem).__name__}")


def _check_writable(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise ApiError(f"{target} is a directory")
    if target.exists() and not overwrite:
        raise ApiError(f"{target} exists; give --force to replace it")


def _attachment_name(response: httpx.Response) -> str | None:
    """The file name of `Content-Disposition: attachment; filename="…"` (or `filename*=utf-8''…`), if it is a
    plain name to save a file under: a path's last part only, and never `..`, a hidden file or control
    characters, so a hostile server cannot write outside the directory or over ~/.bashrc."""
    names: dict[str, str] = {}
    for part in response.headers.get("content-disposition", "").split(";"):
        key, _, value = part.strip().partition("=")
        names[key.strip().lower()] = value.strip()
    if encoded := names.get("filename*", "").partition("''")[2]:
        name = unquote(encoded)
    else:
        name = names.get("filename", "").strip('"')
    name = name.replace("\\", "/").rpartition("/")[2].strip()
    if not name or name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return None
    return name
