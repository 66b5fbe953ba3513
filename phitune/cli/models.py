"""`phitune models`: the base models and the tenant's fine-tuned ones (/v1/models)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from phitune.cli import options
from phitune.cli.options import ApiKey, BaseUrl, Json
from phitune.cli.output import iso, print_table
from phitune.client import DEFAULT_BASE_URL

ModelId = Annotated[str, typer.Argument(help="A fine-tuned model's id, ft:…")]
app = typer.Typer(help="Models to chat with: the base models and your fine-tuned ones.", no_args_is_help=True)


@app.command("list")
def list_models(as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """The server's base models and the tenant's fine-tuned models."""
    options.read("/v1/models", as_json, base_url, api_key, show)


def show(models: dict[str, Any]) -> None:
    print_table(
        ("ID", "OWNED BY", "CREATED", "JOB"),
        [(m["id"], m["owned_by"], iso(m["created"]), m.get("fine_tuning_job")) for m in models["data"]],
    )


@app.command()
def delete(
    model_id: ModelId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """Delete a fine-tuned model: it can no longer be called (its job and adapter stay downloadable)."""
    options.delete(f"/v1/models/{model_id}", as_json, base_url, api_key)
