"""The HTTP client of the `phitune` CLI: requests to a phitune API, its errors, its server-sent events.

Plain httpx and JSON, no server import: the CLI of a base install talks to any phitune server over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# A live event stream sends a keep-alive comment every 15 s (app.jobs.event_stream), so a read that waits
# much longer means the server is gone; a chat stream waits no longer between tokens than this either.
READ_TIMEOUT_SECONDS = 120


class ApiError(Exception):
    """An error the server answered with (OpenAI's shape), or a server that could not be reached."""

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
    """The JSON object an event's data holds ({} if it holds something else)."""
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


class Client:
    """One phitune server, with one bearer key (a tenant's API key, or the admin key for /v1/admin)."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.rstrip("/")
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
        return response.json()

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
            yield from server_sent_events(response.iter_lines())

    def download(self, path: str, destination: Path, **params: Any) -> tuple[Path, int]:
        """Stream a file response to `destination`, or into it under the name the server gives when it is a
        directory; written beside it first, so an interrupted download leaves no partial file by that name."""
        with self.stream("GET", path, params={k: v for k, v in params.items() if v is not None}) as response:
            target = destination
            if destination.is_dir():
                target = destination / (_attachment_name(response) or path.rstrip("/").rpartition("/")[2])
            partial = target.with_name(target.name + ".part")
            size = 0
            try:
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
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
        return ApiError(f"cannot reach phitune at {self.base_url}: {problem or type(problem).__name__}")


def _attachment_name(response: httpx.Response) -> str | None:
    """The file name of `Content-Disposition: attachment; filename="…"`, reduced to a bare name."""
    for part in response.headers.get("content-disposition", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return Path(value.strip('"')).name or None
    return None
