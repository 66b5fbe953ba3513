"""The credentials phitune's processes present to each other, never a tenant's: bearer secrets, each good for
one purpose and compared in constant time.

    worker token     worker → API             claims a queued job, nothing else
    attempt token    worker → API             one attempt of one job: that job's other internal routes
    serving token    inference server → API   downloads adapters, nothing else
    inference token  API → inference server   every route of the inference server but /healthz

How a caller sends one (`bearer`) and how a server checks it (`check_secret`, `RequireSecret`) is defined
here once, for both sides of each pair of processes.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Unauthorized


def bearer(token: str) -> dict[str, str]:
    """The header a process authenticates with."""
    return {"Authorization": f"Bearer {token}"}


def presented(authorization: str | None, what: str) -> str:
    """The secret of an `Authorization: Bearer <secret>` header, or 401 naming the credential expected."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            f"Missing {what}: send 'Authorization: Bearer <{what}>'", code=f"missing_{_code(what)}"
        )
    return token.strip()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality. As bytes: `hmac.compare_digest` raises TypeError on a non-ASCII str, and a
    header may carry any Latin-1 character."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def check_secret(authorization: str | None, expected: str, what: str) -> None:
    """401 unless the header carries `expected`."""
    if not same_secret(presented(authorization, what), expected):
        raise Unauthorized(f"Invalid {what}", code=f"invalid_{_code(what)}")


def _code(what: str) -> str:
    return what.replace(" ", "_")


class RequireSecret:
    """ASGI middleware: every HTTP request but those to `open_paths` must carry `secret`, checked before the
    app reads the body or routes the path, so an unauthenticated caller learns nothing (not even which paths
    exist) and costs no more than its headers."""

    def __init__(self, app: ASGIApp, *, secret: str, what: str, open_paths: Collection[str] = ()) -> None:
        self.app = app
        self.secret = secret
        self.what = what
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            try:
                check_secret(Headers(scope=scope).get("authorization"), self.secret, self.what)
            except Unauthorized as refused:
                headers = {"WWW-Authenticate": "Bearer"}
                await JSONResponse(refused.body(), status_code=401, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
