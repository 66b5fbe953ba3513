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
    help="Files: upload a JSONL dataset; list, show, report on, download or delete datasets and results.",
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
def report(
    file_id: FileId,
    model: Annotated[str | None, typer.Option(help="A base model id; default: the server's first.")] = None,
    max_seq_length: Annotated[int, typer.Option(help="The job's max_seq_length.")] = 2048,
    train_on_inputs: Annotated[bool, typer.Option(help="Count system/user tokens as trained too.")] = False,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """The dataset's report: tokens per example with the base model's tokenizer, trained tokens, what
    max_seq_length cuts, duplicates and empty replies."""
    params: dict[str, Any] = {"max_seq_length": max_seq_length, "train_on_inputs": train_on_inputs}
    if model is not None:
        params["model"] = model
    options.read(f"/v1/files/{file_id}/report", as_json, base_url, api_key, show_report, **params)


def show_report(report: dict[str, Any]) -> None:
    console.print(f"{report['file_id']} with {report['model']}, max_seq_length {report['max_seq_length']}")
    console.print(
        f"{report['examples']} examples, {report['duplicate_examples']} duplicates, "
        f"{report['empty_assistant_turns']} empty assistant turns"
    )
    tokens = report["tokens"]
    if tokens is None:
        console.print(f"No token counts: {report['tokens_unavailable']}")
        return
    console.print(
        f"Tokens per example: min {tokens['min']}, median {tokens['median']:g}, p95 {tokens['p95']}, "
        f"max {tokens['max']} ({tokens['total']:,} in all)"
    )
    console.print(
        f"Trained tokens {report['trained_tokens']:,}; max_seq_length cuts {report['truncated_examples']} "
        f"examples ({report['truncated_tokens']:,} tokens), drops {report['dropped_examples']}"
    )
    widest = max((bin["count"] for bin in tokens["histogram"]), default=0) or 1
    print_table(
        ("TOKENS", "EXAMPLES", ""),
        [
            (f"{bin['start']}-{bin['end'] - 1}", bin["count"], "#" * round(30 * bin["count"] / widest))
            for bin in tokens["histogram"]
        ],
    )


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
