"""The options every command that talks to a server takes, and the client they make."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from phitune.cli.output import fail, fail_with
from phitune.client import ApiError, Client

BaseUrl = Annotated[
    str, typer.Option("--base-url", envvar="PHITUNE_BASE_URL", help="The phitune API to talk to.")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="PHITUNE_API_KEY", help="A tenant's API key.", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print the server's JSON, for scripts.")]
Limit = Annotated[int, typer.Option(min=1, max=100, help="Objects per page.")]
After = Annotated[str | None, typer.Option(help="The id after which the page starts (the last one seen).")]


@contextmanager
def connected(base_url: str, key: str | None) -> Iterator[Client]:
    """A client of the server for the block; an error the server answers with ends the command, printed."""
    if not key:
        fail("no API key: give --api-key or PHITUNE_API_KEY (`phitune keys create --tenant NAME` makes one)")
    client = Client(base_url, key)
    try:
        yield client
    except ApiError as error:
        fail_with(error)
    finally:
        client.close()
