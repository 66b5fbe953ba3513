"""`phitune files`: upload, list, show and delete datasets (/v1/files)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from phitune.cli import options
from phitune.cli.options import After, ApiKey, BaseUrl, Force, Json, Limit, Output, connected
from phitune.cli.output import answer, console, iso, print_page, print_table
from phitune.client import DEFAULT_BASE_URL

app = typer.Typer(
    help="Files: upload a JSONL dataset; list, show, download or delete datasets and result files.",
    no_args_is_help=True,
)
COLUMNS = ("ID", "FILENAME", "EXAMPLES", "FORMAT", "BYTES", "CREATED")
FileId = Annotated[str, typer.Argument(help="file-…")]


def row(file: dict[str, Any]) -> tuple[Any, ...]:
    stats = file.get("stats") or {}
    return (
        file["id"],
        file["filename"],
        stats.get("examples"),
        stats.get("format"),
        file["bytes"],
        iso(file["created_at"]),
    )


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The JSONL dataset.")],
    purpose: Annotated[str, typer.Option(help="The file's purpose.")] = "fine-tune",
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a dataset (streamed); the server validates it line by line and says what is wrong."""
    with connected(base_url, api_key) as client:
        file = client.upload(path, purpose)
    answer(file, as_json, show_uploaded)


def show_uploaded(file: dict[str, Any]) -> None:
    stats = file["stats"]
    console.print(
        f"Uploaded {file['filename']}: {stats['examples']} {stats['format']} examples, {file['bytes']} bytes"
    )
    console.print(file["id"])


@app.command("list")
def list_files(
    limit: Limit = 20,
    after: After = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """The tenant's files, newest first."""
    show_page = partial(print_page, columns=COLUMNS, row=row)
    options.read("/v1/files", as_json, base_url, api_key, show_page, limit=limit, after=after)


@app.command()
def get(
    file_id: FileId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """One file and what validation counted in it."""
    options.read(f"/v1/files/{file_id}", as_json, base_url, api_key, show)


def show(file: dict[str, Any]) -> None:
    print_table(COLUMNS, [row(file)])
    console.print(f"sha256 {file['sha256']}")


@app.command()
def download(
    file_id: FileId,
    output: Output = Path("."),
    force: Force = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a file's content: a dataset as it was uploaded, or a job's metrics CSV (its result file).
    An existing file is never replaced without --force; Ctrl-C or a failure leaves nothing behind."""
    with connected(base_url, api_key) as client:
        path, size = client.download(
            f"/v1/files/{file_id}/content", output, default_name=file_id, overwrite=force
        )
    console.print(f"Saved {path} ({size:,} bytes)")


@app.command()
def delete(
    file_id: FileId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """Delete a file (refused while a queued, running or paused job needs it)."""
    options.delete(f"/v1/files/{file_id}", as_json, base_url, api_key)
