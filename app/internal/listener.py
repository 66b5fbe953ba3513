"""Serving /internal/v1 on a listener of its own (PHITUNE_INTERNAL_PORT), apart from the public API.

`phitune api` runs one uvicorn server on two sockets, so the process keeps one lifespan (one housekeeping
loop, one key cache); this middleware tells the listeners apart by the local port of the connection a
request arrived on, which a client cannot choose (a Host header it could). The internal listener answers
only /internal/v1, /metrics (job counts across all tenants are the operator's, not the public's) and the
health checks; the public one everything else. Anything else is the 404 of an unknown path, before routing,
authentication or reading the body.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import NotFound

INTERNAL_PREFIX = "/internal/"
OPERATOR_PATHS = frozenset({"/metrics"})
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class ListenerSplit:
    def __init__(self, app: ASGIApp, *, internal_port: int) -> None:
        self.app = app
        self.internal_port = internal_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._served(scope):
            refused = NotFound("Not Found")
            await JSONResponse(refused.body(), status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _served(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path in HEALTH_PATHS:
            return True
        server = scope.get("server")  # (host, port) of the socket; None on a Unix socket: public
        on_internal = server is not None and server[1] == self.internal_port
        return (path.startswith(INTERNAL_PREFIX) or path in OPERATOR_PATHS) == on_internal
