"""Downloads of stored blobs, streamed through the API the same way from either backend: Content-Length,
ETag, Accept-Ranges, one `Range` (206; 416 past the end), `If-Range` and `If-None-Match` (304).

Streamed through rather than redirected to a presigned URL: the route's own authentication and tenant check
stay the only way in, and workers and the inference server need no bucket credentials or route to it."""

from __future__ import annotations

import re
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.errors import APIError, NotFound
from app.storage.base import Storage

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(APIError):
    status_code = 416
    error_type = "invalid_request_error"
    default_code = "range_not_satisfiable"


def blob_response(
    request: Request,
    storage: Storage,
    key: str,
    *,
    etag: str,
    media_type: str,
    filename: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The blob at `key` whose strong ETag is `etag` (quoted). Call it from a sync route: it asks storage
    for the size; the body is read later, in the threadpool, as it is sent."""
    sent = {"ETag": etag, **(headers or {})}
    tags = entity_tags(request.headers.get("if-none-match"))
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers=sent)
    try:
        size = storage.size(key)
    except FileNotFoundError:
        raise NotFound("The content is missing from storage", code="content_missing") from None
    sent["Accept-Ranges"] = "bytes"
    if filename is not None:
        sent["Content-Disposition"] = _disposition(filename)
    wanted = _wanted_range(request, etag, size)
    start, stop = wanted or (0, size)
    if wanted is not None:
        sent["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    sent["Content-Length"] = str(stop - start)
    return StreamingResponse(
        storage.read(key, start, stop),
        status_code=206 if wanted else 200,
        media_type=media_type,
        headers=sent,
    )


def entity_tags(if_none_match: str | None) -> set[str]:
    """The strong tags of an If-None-Match header (a weak `W/"x"` matches as `"x"`)."""
    return {tag.strip().removeprefix("W/") for tag in (if_none_match or "").split(",")}


def _wanted_range(request: Request, etag: str, size: int) -> tuple[int, int] | None:
    """The (start, stop) of a single `Range`; None for the whole blob: no Range, an If-Range naming another
    version, or a Range this does not serve (several ranges, other units, malformed), which RFC 9110 lets a
    server ignore."""
    header, if_range = request.headers.get("range"), request.headers.get("if-range")
    if header is None or (if_range is not None and if_range != etag):
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first:
        start, stop = int(first), min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None
    else:
        start, stop = max(size - int(last), 0), size
    if start >= size or stop <= start:
        error = RangeNotSatisfiable(
            f"Range {header!r} is not within the content's {size} bytes", param="Range"
        )
        error.headers = {"Content-Range": f"bytes */{size}"}
        raise error
    return start, stop


def _disposition(filename: str) -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'
