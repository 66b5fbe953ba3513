"""What the CLI prints: JSON for scripts, tables and times for people, errors on stderr with a status."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from phitune.client import ApiError

# soft_wrap: a line is never broken where the terminal would not break it, so ids and commands stay whole;
# markup off: what the server says (a file name, an event's message) is printed as it is, brackets included.
console = Console(highlight=False, soft_wrap=True, markup=False)
# Notes on what a command did besides its answer (a file it uploaded first): stdout stays the answer alone.
notes = Console(highlight=False, soft_wrap=True, markup=False, stderr=True)


# C0 and C1 control characters but the line break and the tab: in what a server says, an escape sequence
# could rewrite the terminal (its title, what was printed before, a fake prompt).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text from a server, safe to print on a terminal: its control characters shown as `\\xNN`."""
    return CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def fail(message: str, status: int = 1) -> NoReturn:
    """Say what went wrong on stderr, as plain text (no wrapping, so scripts can match it), and exit."""
    typer.echo(f"Error: {printable(message)}", err=True)
    raise typer.Exit(status)


def fail_with(error: ApiError) -> NoReturn:
    """The server's error message, with its HTTP status, code and field, and any lines of a refused file."""
    about = [f"HTTP {error.status}"] if error.status else []
    about += [f"code {error.code}"] if error.code else []
    about += [f"param {error.param}"] if error.param else []
    lines = [error.message + (f" ({', '.join(about)})" if about else "")]
    lines += [
        f"  line {d.get('line')}: {d.get('message')} ({d.get('code')})"
        for d in error.details
        if isinstance(d, dict)
    ]
    fail("\n".join(lines))


def print_json(value: Any) -> None:
    """What the server answered, as JSON on stdout, for scripts (`--json`)."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def answer(value: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """What a command read or did: the server's JSON with `--json` (nothing else on stdout), else shown."""
    if as_json:
        print_json(value)
    else:
        show(value)


def print_deleted(deleted: dict[str, Any]) -> None:
    console.print(f"Deleted {deleted['id']}")


def iso(seconds: int | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Rows under their column names; ids and names are never wrapped or cut, so they can be copied."""
    cells = [["-" if cell is None else printable(str(cell)) for cell in row] for row in rows]
    if not cells:
        console.print("(none)", style="dim")
        return
    widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column, no_wrap=True, min_width=width)
    for row in cells:
        table.add_row(*row)
    # Printed at least as wide as its cells, past the terminal's width if need be: Rich would fit the table to
    # the console by cutting cells short and dropping whole columns.
    wide = Console(highlight=False, width=max(console.width, sum(widths) + 2 * (len(widths) - 1)))
    wide.print(table, crop=False)


def print_page(page: dict[str, Any], columns: Sequence[str], row: Any) -> None:
    """One page of a list as a table (`row` makes an object a row), and how to ask for the next."""
    print_table(columns, [row(item) for item in page["data"]])
    if page.get("has_more"):
        console.print(f"(more: --after {page['last_id']})", style="dim")
