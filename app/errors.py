"""API errors and their OpenAI-shaped HTTP responses.

    APIError                        any error the API answers with (status, message, type, param, code)
    ├── InvalidRequest              400 invalid_request_error
    │   └── ModelNotAvailable       400 model_not_available
    ├── Unauthorized                401 authentication_error
    ├── Forbidden                   403 permission_error
    ├── NotFound                    404 invalid_request_error
    ├── Conflict                    409 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── UnsupportedMediaType        415 invalid_request_error
    ├── InvalidFile                 422 invalid_file, with line-numbered details
    ├── RateLimited                 429 requests, with Retry-After (a key's request rate)
    ├── LimitReached                429 invalid_request_error (a tenant's active jobs or event streams)
    └── ServiceUnavailable          503 server_error (the inference server is unreachable)

Database errors that escape a route (a commit that fails, a lost connection) are answered too: a constraint
violation with 409 `conflict`, a value the database cannot hold (text with a NUL character on PostgreSQL) with
400 `invalid_value` (404 when it is an id in the path), anything else with 503 `database_unavailable`. The
transaction is rolled back either way, so such a response never stands for a write that happened.

Services raise these; one exception handler turns them into
`{"error": {"message", "type", "param", "code", "details"?}}` (`ErrorResponse`) so services never build
responses. Routes list the error statuses they can answer with `error_responses(...)` for the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, requests, server_error"
    )
    param: str | None = Field(description="The request field at fault, if any.")
    code: str | None
    details: list[dict[str, Any]] | None = Field(
        None, description="Only on 422 invalid_file: the offending lines, each with its line number."
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "Invalid request: the field at fault is named in `param`",
    401: "Missing or invalid API key",
    403: "Not permitted",
    404: "No such object (for this API key)",
    409: "Conflicts with the object's state",
    413: "Request body too large, or an upload past its limit or the tenant's storage",
    415: "Unsupported media type",
    422: "Invalid file (the offending lines are in `details`), or an Idempotency-Key reused elsewhere",
    429: "Too many requests for this API key (see Retry-After), or a tenant's limit of active jobs or live "
    "event streams reached",
    503: "A service (the database or the inference server) is unavailable; nothing was saved",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting `ErrorResponse` bodies for `statuses`."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses
    }


class APIError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    headers: dict[str, str] | None = None  # sent with the response

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.details = details

    def body(self) -> dict[str, Any]:
        """The `ErrorResponse`; `details` only when there are some. Not validated: an inference server's error
        is passed on as it came."""
        fields: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        if self.details is not None:
            fields["details"] = self.details
        error = ErrorResponse.model_construct(error=ErrorDetail.model_construct(**fields))
        return error.model_dump(exclude_unset=True, warnings=False)


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotAvailable(InvalidRequest):
    default_code = "model_not_available"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    error_type = "permission_error"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class Conflict(APIError):
    """The object's state forbids the request (a finished job cancelled, a file in use). The OpenAI SDKs
    retry a 409 twice, taking it for a lock timeout; `x-should-retry: false`, which they obey, spares the
    user those seconds of waiting for the same answer. (The 409 of a concurrent write, answered by the
    IntegrityError handler below without this header, is worth retrying and is.)"""

    status_code = 409
    error_type = "invalid_request_error"
    headers = {"x-should-retry": "false"}


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "file_too_large"


class UnsupportedMediaType(APIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class InvalidFile(APIError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "invalid_file"


class RateLimited(APIError):
    """OpenAI's answer to a request over a rate: type `requests`, code `rate_limit_exceeded`, and when to
    try again in whole seconds (`Retry-After`), which the OpenAI SDKs wait for before they retry."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class LimitReached(APIError):
    """A tenant holds as many of something (active jobs, live streams) as it may: a 429, which an SDK retries
    after a pause, and which succeeds once one has ended."""

    status_code = 429
    error_type = "invalid_request_error"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class ModelConfigUnavailable(ServiceUnavailable):
    """A configured base model whose config.json the API cannot read: a deployment problem, not the user's."""

    default_code = "model_config_unavailable"


def _param_from_location(loc: tuple[Any, ...]) -> str | None:
    """`("body", "training_config", "r")` → `"training_config.r"`."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _past_literal_member(errors: Sequence[Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The problem to report and its location. For a `Literal[...] | T` field (`"auto"` or a number) whose
    value is neither, pydantic reports the literal member first ("Input should be 'auto'") under the member's
    tag (`n_epochs.literal['auto']`): report T's problem instead, at its place without T's tag, and both when
    the value itself is wrong ("Input should be 'auto' or greater than 0")."""
    first = errors[0]
    *field, tag = first.get("loc", ()) or ("",)
    if first.get("type") != "literal_error" or not str(tag).startswith("literal["):
        return first, tuple(first.get("loc", ()))
    depth = len(field)
    other = next((e for e in errors[1:] if len(e["loc"]) > depth and list(e["loc"][:depth]) == field), None)
    if other is None:
        return first, tuple(field)
    if len(other["loc"]) == depth + 1 and other["msg"].startswith("Input should be "):
        other = {**other, "msg": f"{first['msg']} or {other['msg'].removeprefix('Input should be ')}"}
    return other, (*field, *other["loc"][depth + 1 :])


def _unparsed_body(exc: RequestValidationError) -> dict[str, Any] | None:
    """The error of a body that is not JSON at all, if that is the problem."""
    return next((error for error in exc.errors() if error.get("type") == "json_invalid"), None)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first pydantic problem, naming the field, as a 400."""
    if (unparsed := _unparsed_body(exc)) is not None:
        reason = (unparsed.get("ctx") or {}).get("error", "not JSON")
        return InvalidRequest(f"The request body is not valid JSON: {reason}.", code="invalid_json")
    first, loc = _past_literal_member(exc.errors())
    param = _param_from_location(loc)
    message = first.get("msg", "Invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"Unknown field '{param}'"
    elif param:
        message = f"Invalid '{param}': {message}"
    code = "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value"
    return InvalidRequest(message, param=param, code=code)


def install_error_handlers(
    app: FastAPI, check_credentials: Callable[[Request], Awaitable[None]] | None = None
) -> None:
    """The OpenAI error shape for every error. `check_credentials` raises the APIError a request's
    credentials earn (app.deps.check_credentials): FastAPI parses a JSON body before it resolves the route's
    dependencies, so a body that is not JSON would otherwise be a 400 to a caller without a valid key."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else exc.headers
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if check_credentials is not None and _unparsed_body(exc) is not None:
            try:
                await check_credentials(request)
            except APIError as refused:
                return await _api_error(request, refused)
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_: Request, exc: IntegrityError) -> JSONResponse:
        error = Conflict("The request conflicts with a concurrent change; nothing was saved", code="conflict")
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # What the request said, the database cannot hold: on PostgreSQL, text with a NUL character (U+0000),
        # which a path, a query or a JSON string can carry, or a number out of a column's range. The client's
        # doing, not an outage: an id in the path no object can have is 404, as a missing one; anything else
        # a 400. Nothing was saved (the transaction is rolled back).
        if any("\x00" in str(value) for value in request.path_params.values()):
            error: APIError = NotFound("No such object")
        else:
            error = InvalidRequest(
                "The request holds a value the database cannot store (text with a NUL character, U+0000, or "
                "a number out of range)",
                code="invalid_value",
            )
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(_: Request, exc: SQLAlchemyError) -> JSONResponse:
        error = ServiceUnavailable(
            "The database could not complete the request; nothing was saved. Retry later.",
            code="database_unavailable",
        )
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=headers or None)


def _allowed_methods(request: Request) -> str:
    """The methods of every route at the request's path. A 405's `Allow` (RFC 9110) must list them all, while
    Starlette's names only those of the first route that matched the path (FastAPI makes one per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)  # PARTIAL: the path is the route's, the method is not
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))
