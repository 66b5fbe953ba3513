"""X-Request-ID: each request's id (the client's or a proxy's when sane, else a fresh one), answered on every
response, errors included, and set in `app.log_setup.request_id` for the request's log lines and for what it
sends on (the inference server's /generate, a job's training message). Also the access line of a request
(PHITUNE_ACCESS_LOG), logged here with its id rather than by uvicorn."""

from __future__ import annotations

import logging
from typing import Literal
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.log_setup import REQUEST_ID_HEADER, request_id, sane_request_id

HEADER = REQUEST_ID_HEADER.lower().encode()
AccessLog = Literal["all", "writes", "off"]
READS = frozenset({"GET", "HEAD", "OPTIONS"})
access = logging.getLogger("app.access")


class RequestId:
    """Pure ASGI middleware: on the hot path of every request, so it only reads one header and adds one.
    `access_log`: which requests get an access line, at their response's start (`writes`: all but reads,
    whose pollers would fill the log; a line cost ~5 % of a poll's CPU)."""

    def __init__(self, app: ASGIApp, access_log: AccessLog = "writes") -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), b"")
        current = sane_request_id(given.decode("latin-1"))
        answered = (HEADER, current.encode())
        logged = self.access_log == "all" or (self.access_log == "writes" and scope["method"] not in READS)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), answered]
                if logged:
                    _log_access(scope, message["status"])
            await send(message)

        token = request_id.set(current)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def _log_access(scope: Scope, status: int) -> None:
    """uvicorn's access line: `127.0.0.1:39896 - "POST /v1/files HTTP/1.1" 200`."""
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    # Quoted as uvicorn's own line is: the path arrives percent-decoded, and a %0A in it would start a
    # forged line of a text log.
    target = quote(scope.get("root_path", "") + scope["path"])
    if query := scope.get("query_string"):
        target += "?" + query.decode("latin-1")
    access.info('%s - "%s %s HTTP/%s" %d', peer, scope["method"], target, scope["http_version"], status)
