"""`phitune models`: the base models and the tenant's fine-tuned ones (/v1/models)."""

from __future__ import annotations

from typing import Annotated

import typer

from phitune.cli.options import ApiKey, BaseUrl, Json, connected
from phitune.cli.output import console, iso, print_json, print_table
from phitune.client import DEFAULT_BASE_URL

app = typer.Typer(help="Models to chat with: the base models and your fine-tuned ones.", no_args_is_help=True)


@app.command("list")
def list_models(as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """The server's base models and the tenant's fine-tuned models."""
    with connected(base_url, api_key) as client:
        models = client.get("/v1/models")
    if as_json:
        print_json(models)
        return
    print_table(
        ("ID", "OWNED BY", "CREATED", "JOB"),
        [(m["id"], m["owned_by"], iso(m["created"]), m.get("fine_tuning_job")) for m in models["data"]],
    )


@app.command()
def delete(
    model_id: Annotated[str, typer.Argument(help="A fine-tuned model's id, ft:…")],
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a fine-tuned model: it can no longer be called (its job and adapter stay downloadable)."""
    with connected(base_url, api_key) as client:
        deleted = client.delete(f"/v1/models/{model_id}")
    if as_json:
        print_json(deleted)
    else:
        console.print(f"Deleted {deleted['id']}")
