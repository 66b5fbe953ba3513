"""A cap on request bodies, enforced before any route reads one, and so before authentication: a client
without an API key can make the API hold at most `max_request_body_bytes` of its body, never all of it.

A body whose Content-Length is over the cap is answered 413 at once, unread. Any other body (chunked, or
declared within the cap) is read here, at most the cap of it, and handed to the app whole; one that turns out
larger is answered 413 as soon as it passes the cap, the rest never read. The 413 closes the connection.

Routes that stream their bodies to storage only once the caller is authenticated, each within a limit of its
own, are left to do so (`streams_its_body`): dataset uploads (`max_upload_bytes`) and the archives and
resume states workers upload under their attempt tokens.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge


def streams_its_body(method: str, path: str) -> bool:
    """Whether a request goes to a route that streams its body after authenticating, within its own limit."""
    if method == "POST":
        return path.rstrip("/") == "/v1/files"
    return method == "PUT" and path.startswith("/internal/v1/")


class BodyLimit:
    """Pure ASGI middleware (see app.metrics.RequestMetrics for why not BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or streams_its_body(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared, chunked = _framing(scope)
        if declared is None and not chunked:
            # No body (HTTP/1.1 gives a request one only by Content-Length or Transfer-Encoding): a poll's
            # GET, passed on untouched.
            await self.app(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it had sent its request: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            # The body once, then the client's own messages (a streaming response waits for its disconnect).
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(
            f"The request body is larger than {self.max_bytes} bytes (PHITUNE_MAX_REQUEST_BODY_BYTES)",
            code="request_too_large",
        )
        response = JSONResponse(error.body(), status_code=error.status_code, headers={"Connection": "close"})
        await response(scope, receive, send)


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared body size (None when there is none, or it is not a number: the server refuses those), and
    whether a Transfer-Encoding is given (a chunked body, its size known only once read)."""
    declared, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            chunked = True
    return declared, chunked
