"""What /openapi.json declares for several routes, once: query and header parameters with their bounds (a
client or a fuzzer reading the document learns `limit` ≤ 100 from it, not from a 400), the API's security
schemes, and the events of server-sent event streams."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Header, Query
from fastapi.security import HTTPBearer

from app.idempotency import MAX_KEY_LENGTH
from app.pagination import MAX_LIMIT

MAX_CURSOR_CHARS = 64  # the longest object id

# Each route gives its own default (`limit: Limit = 20`).
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Objects per page.")]
After = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="The last id of the previous page; the page after it."),
]
Order = Annotated[
    Literal["asc", "desc"],
    Query(description="`desc` (the default, as OpenAI lists them): newest first; `asc`: oldest first."),
]
# Bounds stated only (`json_schema_extra`): app.idempotency checks the key itself, naming the header.
IdempotencyKey = Annotated[
    str | None,
    Header(
        json_schema_extra={"minLength": 1, "maxLength": MAX_KEY_LENGTH},
        description="A retry with the same key and request returns what the first one created (48 hours).",
    ),
]

# What the document says the public routes take: `Authorization: Bearer <key>`. Declarations only
# (`auto_error=False`): app.deps checks the raw header itself, a 401 in OpenAI's shape whatever is wrong.
API_KEY = HTTPBearer(
    scheme_name="APIKey", description="A tenant's API key (`phitune keys create`).", auto_error=False
)
ADMIN_KEY = HTTPBearer(
    scheme_name="AdminKey",
    description="The admin key (PHITUNE_ADMIN_KEY), on /v1/admin only.",
    auto_error=False,
)


def event_stream(model: str, *, last_data: str) -> dict[str, Any]:
    """The `text/event-stream` content of a response as OpenAPI 3.2 describes one: `itemSchema` is each
    event (`id`, `event`, `data`), its `data` the JSON of `model`, but for the event that ends the stream,
    whose data is `last_data` (`[DONE]`, `{}`). A `schema` of `model` alone would say each event *is* one."""
    data = {"type": "string", "contentMediaType": "application/json"}
    return {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "id": {"type": "string"},
                "event": {"type": "string"},
                "data": {
                    "anyOf": [
                        {**data, "contentSchema": {"$ref": f"#/components/schemas/{model}"}},
                        {"const": last_data},
                    ]
                },
            },
        }
    }
