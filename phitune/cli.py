"""The `phitune` command: run the processes, migrate the database, manage keys, make the tiny model."""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import json
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

SERVER_STOP_GRACE_SECONDS = 15  # the API and inference server; the worker's is a setting
DISTRIBUTION = "phitune"
# Where the extras are read from when phitune runs from a source tree that was never installed.
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def extra_requirements(extra: str) -> list[Requirement]:
    """What `phitune[extra]` adds to the base install: from the installed distribution's metadata, else from
    pyproject.toml beside this package, else nothing (a missing library then fails at its import)."""
    try:
        requirements = [Requirement(line) for line in metadata.requires(DISTRIBUTION) or []]
    except metadata.PackageNotFoundError:
        try:
            project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
            lines = project["optional-dependencies"].get(extra, [])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return []
        requirements = [Requirement(line) for line in lines]
        return [r for r in requirements if r.marker is None or r.marker.evaluate()]
    # The extra's own lines; a base dependency's marker (a platform's, say) holds without the extra too.
    return [
        r
        for r in requirements
        if r.marker and r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""})
    ]


def extra_modules(extra: str) -> list[str]:
    """The top-level modules `phitune[extra]` installs. Each distribution the extras name is imported under
    its own name (tests/test_install_boundaries.py checks it), so no table of import names is kept."""
    modules = []
    for requirement in extra_requirements(extra):
        name = canonicalize_name(requirement.name)
        if name == DISTRIBUTION:  # an extra made of others, as dev is
            modules += [module for other in sorted(requirement.extras) for module in extra_modules(other)]
        else:
            modules.append(name.replace("-", "_"))
    return modules


def require_extras(*extras: str) -> None:
    """Fail saying what to install when a command needs an extra this install lacks."""
    missing = [
        extra for extra in extras if any(importlib.util.find_spec(m) is None for m in extra_modules(extra))
    ]
    if missing:
        raise click.ClickException(
            f"this command needs phitune[{','.join(missing)}]: pip install 'phitune[{','.join(extras)}]'"
        )


@click.group()
def main() -> None:
    """phitune: LoRA fine-tuning of Phi-3 behind an OpenAI-compatible API."""


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    import migrations

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    click.echo("database is at the latest schema")


@main.group()
def keys() -> None:
    """Manage API keys: local commands on the database (the admin API does the same over HTTP)."""


@contextmanager
def keys_database() -> Iterator[Session]:
    """The unit of work of a `keys` command; a database never migrated fails saying what to run."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from app.db import session_scope
    from app.errors import APIError

    try:
        with session_scope(get_settings().resolved_database_url) as session:
            yield session
    except (OperationalError, ProgrammingError) as error:  # no tables: the schema was never migrated
        raise click.ClickException(
            f"the database is not ready ({error.orig}); run `phitune migrate` first"
        ) from None
    except APIError as error:  # what the admin API would answer with a 4xx
        raise click.ClickException(error.message) from None


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `12h`, `30d`, `2w` → seconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.isascii() or not number.isdigit() or int(number) == 0:
        raise click.BadParameter(f"{text!r}: expected a positive number and a unit, e.g. 30d (s, m, h, d, w)")
    return int(number) * DURATION_UNITS[unit]


def parse_time(text: str) -> int:
    """An ISO 8601 time (UTC when it names no offset) → unix seconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected an ISO 8601 time, e.g. 2027-01-31T12:00:00Z") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def iso(seconds: int | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name; created if it does not exist.")
@click.option("--expires-in", help="The key stops working after this long: 90s, 15m, 12h, 30d, 2w.")
@click.option("--expires-at", help="The key stops working at this ISO 8601 time (UTC if no offset).")
def create_key(tenant: str, expires_in: str | None, expires_at: str | None) -> None:
    """Create an API key; it is printed once, alone on the last line."""
    from app.admin import service

    if expires_in is not None and expires_at is not None:
        raise click.UsageError("give --expires-in or --expires-at, not both")
    with keys_database() as session:
        row, key = service.create_key(
            session,
            tenant,
            expires_in=None if expires_in is None else parse_duration(expires_in),
            expires_at=None if expires_at is None else parse_time(expires_at),
        )
        expires = "never expires" if row.expires_at is None else f"expires {iso(row.expires_at)}"
        described = f"{row.id} ({row.prefix}…, {expires})"
    click.echo(f"Created API key {described} for tenant '{tenant}'. Store it now; it cannot be shown again:")
    click.echo(key)


@keys.command("list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, as the admin API lists keys.")
def list_keys(tenant: str | None, as_json: bool) -> None:
    """List API keys, oldest first, revoked and expired ones included (never the keys themselves)."""
    from app.admin import service
    from app.admin.schemas import ApiKeyObject

    with keys_database() as session:
        rows = [ApiKeyObject.from_row(row) for row in service.all_keys(session, tenant)]
    if as_json:
        click.echo(json.dumps([row.model_dump() for row in rows], indent=2))
        return
    table = [("ID", "PREFIX", "TENANT", "CREATED", "EXPIRES", "REVOKED")] + [
        (r.id, r.prefix, r.tenant, iso(r.created_at), iso(r.expires_at), iso(r.revoked_at)) for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke the key KEY_ID (as `keys list` shows it) for good."""
    from app.admin import service

    with keys_database() as session:
        already = service.get_key(session, key_id).revoked_at is not None
        row = service.revoke_key(session, key_id)
        described = f"{row.id} ({row.prefix}…) of tenant '{row.tenant.name}'"
    if already:
        click.echo(f"{described} was already revoked at {iso(row.revoked_at)}")
        return
    # Each API process trusts a key it checked for PHITUNE_API_KEY_CACHE_SECONDS (app.auth.KeyCache).
    seconds = get_settings().api_key_cache_seconds
    click.echo(f"Revoked {described}; running API processes refuse it within {seconds:g} s")


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
def make_tiny_model_command(directory: Path, seed: int) -> None:
    """Write a small random Phi-3 with a locally trained tokenizer to DIRECTORY."""
    require_extras("serve")
    from worker.tiny_model import make_tiny_model

    make_tiny_model(directory, seed=seed)
    click.echo(f"tiny Phi-3 written to {directory}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--internal-host",
    default="127.0.0.1",
    show_default=True,
    help="Where /internal/v1 listens when PHITUNE_INTERNAL_PORT is set.",
)
def api(host: str, port: int, internal_host: str) -> None:
    """Run the API server (uvicorn); with PHITUNE_INTERNAL_PORT, /internal/v1 is served on that port only."""
    internal_port = get_settings().internal_port
    if internal_port == port:
        raise click.BadParameter("must differ from PHITUNE_INTERNAL_PORT", param_hint="--port")
    internal = (internal_host, internal_port) if internal_port is not None else None
    serve_asgi("app.main:create_app", host=host, port=port, internal=internal)


# How `phitune api` serves (bench/api.py serves its bare baseline app the same way).
API_SERVER_OPTIONS: dict[str, Any] = {"log_level": "info"}


def serve_asgi(factory: str, *, host: str, port: int, internal: tuple[str, int] | None = None) -> None:
    """Serve the ASGI app that `factory` ("module:function") makes with uvicorn, as `phitune api` does; also
    on the `internal` (host, port) if given."""
    import uvicorn

    make_app = functools.partial(_make_and_freeze, factory)
    if internal is None:
        uvicorn.run(make_app, factory=True, host=host, port=port, **API_SERVER_OPTIONS)
        return
    # One server on two sockets rather than two servers: one process, one lifespan (housekeeping, key cache),
    # one graceful shutdown. The app tells the sockets apart by port (app.internal.listener).
    config = uvicorn.Config(make_app, factory=True, host=host, port=port, **API_SERVER_OPTIONS)
    internal_socket = uvicorn.Config(make_app, host=internal[0], port=internal[1]).bind_socket()
    server = uvicorn.Server(config)
    server.run(sockets=[config.bind_socket(), internal_socket])
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure status, as uvicorn.run exits with


def _make_and_freeze(factory: str) -> Any:
    """The app, then everything made so far (modules, routes, schemas: the process's life) frozen out of the
    cyclic garbage collector: a full collection then walks only what requests left behind. Unfrozen, each
    took ~110 ms under 2,000 requests/s, a stall for every request in flight (`python -m bench api`)."""
    from uvicorn.importer import import_from_string

    app = import_from_string(factory)()
    gc.collect()
    gc.freeze()
    return app


GPU_OPTION = click.option(
    "--gpu",
    type=click.IntRange(min=0),
    default=None,
    help="The GPU to use, counted among the visible ones (default: PHITUNE_GPU, else the first).",
)


def use_one_gpu(gpu: int | None) -> None:
    """Pin this process to one GPU before torch loads, and fail now if PHITUNE_DEVICE=cuda cannot be met."""
    from worker.devices import VISIBLE, pin_one_gpu

    try:
        os.environ[VISIBLE] = pin_one_gpu(os.environ, gpu)
    except ValueError as problem:
        raise click.BadParameter(str(problem), param_hint="--gpu") from None
    if get_settings().device == "cuda":
        from worker.hardware import cuda_problem

        if unusable := cuda_problem():
            raise click.ClickException(f"PHITUNE_DEVICE=cuda, but CUDA cannot be used: {unusable}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True)
@GPU_OPTION
def inference(host: str, port: int, gpu: int | None) -> None:
    """Run the inference server: base models loaded once, adapters on demand, batched generation."""
    require_extras("serve")
    use_one_gpu(gpu)
    import uvicorn

    from worker.bootstrap import ensure_tiny_model
    from worker.serving.server import create_inference_app

    settings = get_settings()
    ensure_tiny_model(settings)
    uvicorn.run(create_inference_app(settings), host=host, port=port, log_level="info")


@main.command()
@GPU_OPTION
def worker(gpu: int | None) -> None:
    """Run a Celery training worker (queue `training`, one job at a time) on one GPU: run one per GPU."""
    require_extras("train")
    use_one_gpu(gpu)
    from worker.bootstrap import ensure_tiny_model

    ensure_tiny_model(get_settings())
    # The recipe imports torch, transformers, peft and TRL (about 5 s here): pay that at start, not on the
    # first job, which would otherwise train that much later (bench/service.py's cold overhead).
    importlib.import_module("worker.recipe")
    from worker.celery_app import celery_app

    celery_app.worker_main(
        [
            "worker",
            "--pool=solo",  # one job per process, one process per GPU
            "--queues=training",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname=phitune-worker@%h",
        ]
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--inference-port", default=8001, show_default=True)
def serve(host: str, port: int, inference_port: int) -> None:
    """All in one: migrate, then run the API, a worker and the inference server until Ctrl-C / SIGTERM.

    A child that dies is restarted (with backoff) while the others keep running.
    """
    require_extras("train", "serve")
    from phitune.launch import phitune_command
    from phitune.supervisor import Child, Supervisor
    from worker.bootstrap import ensure_tiny_model
    from worker.devices import gpu_assignment, visible_gpus

    settings = get_settings()
    click.get_current_context().invoke(migrate)
    ensure_tiny_model(settings)
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    # With PHITUNE_INTERNAL_PORT, the API serves /internal/v1 there, on 127.0.0.1 (its --internal-host).
    api_url = (
        f"http://127.0.0.1:{settings.internal_port}"
        if settings.internal_port
        else f"http://{reachable}:{port}"
    )
    env = {
        **os.environ,
        "PHITUNE_API_URL": api_url,
        "PHITUNE_INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
    }
    # The worker's grace is long enough to save its training state; the servers only finish requests.
    worker_grace = settings.stop_grace_seconds
    server_grace = min(SERVER_STOP_GRACE_SECONDS, worker_grace)
    gpus = gpu_assignment(len(visible_gpus(os.environ)))
    worker_gpu = ["--gpu", str(gpus["worker"])] if gpus else []
    inference_gpu = ["--gpu", str(gpus["inference"])] if gpus else []
    if gpus and gpus["worker"] == gpus["inference"]:
        # One GPU for both: the inference server's KV cache must leave the training job room.
        env.setdefault("PHITUNE_INFERENCE_GPU_MEMORY_FRACTION", "0.25")
    supervisor = Supervisor(
        [
            Child(
                "api", phitune_command("api", "--host", host, "--port", str(port)), server_grace, stop_wave=1
            ),
            # Stopped first: it saves its training state and hands its job back to the API, still up.
            Child("worker", phitune_command("worker", *worker_gpu), worker_grace, stop_wave=0),
            Child(
                "inference",
                phitune_command(
                    "inference", "--host", "127.0.0.1", "--port", str(inference_port), *inference_gpu
                ),
                server_grace,
                stop_wave=1,
            ),
        ],
        env,
    )
    supervisor.run(
        on_started=lambda: click.echo(f"phitune is serving on http://{reachable}:{port} (Ctrl-C stops it)")
    )


if __name__ == "__main__":
    main()
