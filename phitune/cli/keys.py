"""`phitune keys`: API keys, either on the database directly (what makes the first key, before any server or
admin key exists) or, given an admin key, through a server's admin API (/v1/admin) over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phitune.cli.options import BaseUrl, connected
from phitune.cli.output import console, fail, iso, print_table
from phitune.client import DEFAULT_BASE_URL, Client

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(
    help="API keys: on the database (PHITUNE_DATABASE_URL / PHITUNE_DATA_DIR), or with --admin-key through "
    "the admin API of --base-url.",
    no_args_is_help=True,
)
AdminKey = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="PHITUNE_ADMIN_KEY",
        help="Go through the admin API of --base-url with this key rather than to the database. Prefer "
        "PHITUNE_ADMIN_KEY: an option's value is visible to other users of this machine (ps).",
        show_default=False,
    ),
]


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
ADMIN = "/v1/admin/keys"


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `12h`, `30d`, `2w` → seconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.isascii() or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(f"{text!r}: expected a positive number and a unit, e.g. 30d (s, m, h, d, w)")
    return int(number) * DURATION_UNITS[unit]


def parse_time(text: str) -> int:
    """An ISO 8601 time (UTC when it names no offset) → unix seconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected an ISO 8601 time, e.g. 2027-01-31T12:00:00Z") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


@contextmanager
def keys_database() -> Iterator[Session]:
    """The unit of work of a local `keys` command; a database never migrated fails saying what to run."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from app.config import get_settings
    from app.db import session_scope
    from app.errors import APIError

    try:
        with session_scope(get_settings().resolved_database_url) as session:
            yield session
    except (OperationalError, ProgrammingError) as error:  # no tables: the schema was never migrated
        fail(f"the database is not ready ({error.orig}); run `phitune migrate` first")
    except APIError as error:  # what the admin API would answer with a 4xx
        fail(error.message)


def described(key: dict[str, Any]) -> str:
    return f"{key['id']} ({key['prefix']}…) of tenant '{key['tenant']}'"


def expiry(parser: Callable[[str], int], metavar: str, help: str) -> Any:
    """The option of an expiry given as text: parsed to unix seconds, or to a number of seconds."""
    return typer.Option(parser=parser, metavar=metavar, help=help)


ExpiresIn = Annotated[
    int | None,
    expiry(parse_duration, "DURATION", "The key stops working after this long: 90s, 15m, 12h, 30d, 2w."),
]
ExpiresAt = Annotated[
    int | None, expiry(parse_time, "TIME", "The key stops working at this ISO 8601 time (UTC if no offset).")
]


@app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
    expires_in: ExpiresIn = None,
    expires_at: ExpiresAt = None,
    admin_key: AdminKey = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Create an API key; it is printed once, alone on the last line."""
    if expires_in is not None and expires_at is not None:
        fail("give --expires-in or --expires-at, not both", status=2)
    if admin_key:
        body = {"tenant": tenant, "expires_in": expires_in, "expires_at": expires_at}
        with connected(base_url, admin_key) as client:
            created = client.post(ADMIN, {k: v for k, v in body.items() if v is not None})
        key_id, prefix, expiry, key = created["id"], created["prefix"], created["expires_at"], created["key"]
    else:
        from app.admin import service

        with keys_database() as session:
            row, key = service.create_key(session, tenant, expires_in=expires_in, expires_at=expires_at)
            key_id, prefix, expiry = row.id, row.prefix, row.expires_at
    expires = "never expires" if expiry is None else f"expires {iso(expiry)}"
    typer.echo(
        f"Created API key {key_id} ({prefix}…, {expires}) for tenant '{tenant}'. "
        "Store it now; it cannot be shown again:"
    )
    typer.echo(key)


@app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON array of the admin API's key objects.")
    ] = False,
    admin_key: AdminKey = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """List API keys, oldest first, revoked and expired ones included (never the keys themselves)."""
    if admin_key:
        with connected(base_url, admin_key) as client:
            keys = list(reversed(all_pages(client, tenant)))  # the admin API lists newest first
    else:
        from app.admin import service
        from app.admin.schemas import ApiKeyObject

        with keys_database() as session:
            keys = [ApiKeyObject.from_row(row).model_dump() for row in service.all_keys(session, tenant)]
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    print_table(
        ("ID", "PREFIX", "TENANT", "CREATED", "EXPIRES", "REVOKED"),
        [
            (
                k["id"],
                k["prefix"],
                k["tenant"],
                iso(k["created_at"]),
                iso(k["expires_at"]),
                iso(k["revoked_at"]),
            )
            for k in keys
        ],
    )


def all_pages(client: Client, tenant: str | None) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.get(ADMIN, tenant=tenant, limit=100, after=after)
        keys += page["data"]
        if not page["has_more"]:
            return keys
        after = page["last_id"]


@app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (key-…), as `keys list` shows it.")],
    admin_key: AdminKey = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Revoke the key KEY_ID for good."""
    if admin_key:
        with connected(base_url, admin_key) as client:
            before = client.get(f"{ADMIN}/{key_id}")
            key = client.post(f"{ADMIN}/{key_id}/revoke")
        # The API process that answered forgets it at once; the others within their key cache's time.
        refused = "the API refuses it now (other API processes within PHITUNE_API_KEY_CACHE_SECONDS)"
    else:
        from app.admin import service
        from app.admin.schemas import ApiKeyObject
        from app.config import get_settings

        with keys_database() as session:
            before = {"revoked_at": service.get_key(session, key_id).revoked_at}
            key = ApiKeyObject.from_row(service.revoke_key(session, key_id)).model_dump()
        # Each API process trusts a key it checked for PHITUNE_API_KEY_CACHE_SECONDS (app.auth.KeyCache).
        refused = f"running API processes refuse it within {get_settings().api_key_cache_seconds:g} s"
    if before["revoked_at"] is not None:
        console.print(f"{described(key)} was already revoked at {iso(key['revoked_at'])}")
    else:
        console.print(f"Revoked {described(key)}; {refused}")
