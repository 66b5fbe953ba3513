"""`phitune jobs export`: a job's merged model (the base with the adapter folded in), made by a worker,
waited for and extracted into a Hugging Face directory (/v1/fine_tuning/jobs/{id}/exports)."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from phitune.cli.options import ApiKey, BaseUrl, Json, connected
from phitune.cli.output import answer, console, fail, iso, notes, print_table, printable
from phitune.client import DEFAULT_BASE_URL, Client

JOBS = "/v1/fine_tuning/jobs"
POLL_SECONDS = 2.0
DONE = ("succeeded", "failed")
COLUMNS = ("ID", "JOB", "STATUS", "BYTES", "CREATED")


def show(export: dict[str, Any]) -> None:
    print_table(
        COLUMNS,
        [(export["id"], export["job_id"], export["status"], export["bytes"], iso(export["created_at"]))],
    )
    if export.get("error"):
        console.print(printable(f"error: {export['error']['message']} ({export['error']['code']})"))


def export(
    job_id: Annotated[str, typer.Argument(help="ftjob-…")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the worker has made it.")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Download it and extract it into this directory (new or empty); implies --wait.",
            file_okay=False,
        ),
    ] = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Export a job's merged model: its base model with the adapter merged in, as a Hugging Face directory
    (sharded safetensors, tokenizer, chat template) that AutoModelForCausalLM.from_pretrained, vLLM and
    llama.cpp's convert_hf_to_gguf.py load. Asking again returns the same export."""
    if output is not None and output.exists() and any(output.iterdir()):
        fail(f"{output} is not empty")
    with connected(base_url, api_key) as client:
        made = client.post(f"{JOBS}/{job_id}/exports", {"format": "merged"})
        if wait or output is not None:
            made = _wait(client, made)
        if output is not None and made["status"] == "succeeded":
            size = _extract(client, made, output)
            notes.print(f"Extracted {size:,} bytes into {output}")
    answer(made, as_json, show)
    if made["status"] == "failed":
        raise typer.Exit(1)


def _wait(client: Client, made: dict[str, Any]) -> dict[str, Any]:
    """Poll the export until it has succeeded or failed."""
    while made["status"] not in DONE:
        time.sleep(POLL_SECONDS)
        made = client.get(f"{JOBS}/{made['job_id']}/exports/{made['id']}")
    return made


def _extract(client: Client, made: dict[str, Any], output: Path) -> int:
    """Download the tar beside `output` and extract it there (plain files only), then remove the tar: a
    failure leaves nothing behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
        archive, size = client.download(
            f"{JOBS}/{made['job_id']}/exports/{made['id']}/content",
            Path(scratch) / "merged.tar",
            default_name="merged.tar",
        )
        staged = Path(scratch) / "merged"
        with tarfile.open(archive, "r:") as tar:
            tar.extractall(staged, filter="data")  # refuses links out, absolute paths and devices
        output.mkdir(exist_ok=True)
        for path in staged.iterdir():
            shutil.move(path, output / path.name)
    return size
