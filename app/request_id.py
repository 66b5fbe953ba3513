"""X-Request-ID: each request's id (the client's or a proxy's when sane, else a fresh one), answered on every
response, errors included, and set in `app.log_setup.request_id` for the request's log lines and for what it
sends on (the inference server's /generate, a job's training message)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.log_setup import REQUEST_ID_HEADER, request_id, sane_request_id

HEADER = REQUEST_ID_HEADER.lower().encode()


class RequestId:
    """Pure ASGI middleware: on the hot path of every request, so it only reads one header and adds one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), b"")
        current = sane_request_id(given.decode("latin-1"))
        answered = (HEADER, current.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), answered]
            await send(message)

        token = request_id.set(current)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
