"""The options every command that talks to a server takes, and the client they make."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from phitune.cli.output import answer, fail, fail_with, print_deleted
from phitune.client import ApiError, Client

BaseUrl = Annotated[
    str, typer.Option("--base-url", envvar="PHITUNE_BASE_URL", help="The phitune API to talk to.")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="PHITUNE_API_KEY",
        help="A tenant's API key. Prefer PHITUNE_API_KEY: an option's value is visible to other users of "
        "this machine (ps, /proc) and kept in shell history.",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the server's JSON, for scripts.")]
Limit = Annotated[int, typer.Option(min=1, max=100, help="Objects per page.")]
After = Annotated[str | None, typer.Option(help="The id after which the page starts (the last one seen).")]
Output = Annotated[
    Path, typer.Option("--output", "-o", help="A file, or a directory to save it in under the server's name.")
]
Force = Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")]


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
    except OSError as error:  # a local file that cannot be read (an upload) or written
        fail(f"{error.filename or 'a file'}: {error.strerror or error}")
    finally:
        client.close()


def delete(path: str, as_json: bool, base_url: str, key: str | None) -> None:
    """DELETE an object (a file, a model) and say so: `Deleted ID`, or the server's JSON with --json."""
    with connected(base_url, key) as client:
        deleted = client.delete(path)
    answer(deleted, as_json, print_deleted)


def read(
    path: str, as_json: bool, base_url: str, key: str | None, show: Callable[[Any], None], **params: Any
) -> None:
    """GET an object or a page of a list and print it: `show`n, or the server's JSON with --json."""
    with connected(base_url, key) as client:
        value = client.get(path, **params)
    answer(value, as_json, show)
