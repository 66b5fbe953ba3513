"""The commands that run phitune's processes on this machine: migrate, api, worker, inference, serve, and
make-tiny-model. They read the server's settings (PHITUNE_…); the worker's libraries are imported only by the
commands that need them, once `require_extras` has said what is missing."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phitune.cli.extras import require_extras
from phitune.cli.output import fail

if TYPE_CHECKING:
    from app.config import Settings

SERVER_STOP_GRACE_SECONDS = 15  # the API and inference server; the worker's is a setting

Host = Annotated[str, typer.Option(help="The address to listen on.")]
Gpu = Annotated[
    int | None,
    typer.Option(
        min=0, help="The GPU to use, counted among the visible ones (default: PHITUNE_GPU, else the first)."
    ),
]


def get_settings() -> Settings:
    """The server's settings, imported when a process command runs: the HTTP commands start faster without."""
    from app.config import get_settings

    return get_settings()


def migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    import migrations

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    typer.echo("database is at the latest schema")


def make_tiny_model(
    directory: Annotated[Path, typer.Argument(file_okay=False, help="Where to write it.")],
    seed: Annotated[int, typer.Option(help="The random seed of the weights.")] = 0,
) -> None:
    """Write a small random Phi-3 with a locally trained tokenizer to DIRECTORY."""
    require_extras("serve")
    from worker.tiny_model import make_tiny_model

    make_tiny_model(directory, seed=seed)
    typer.echo(f"tiny Phi-3 written to {directory}")


def api(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The public port.")] = 8000,
    internal_host: Annotated[
        str, typer.Option(help="Where /internal/v1 listens when PHITUNE_INTERNAL_PORT is set.")
    ] = "127.0.0.1",
) -> None:
    """Run the API server (uvicorn); with PHITUNE_INTERNAL_PORT, /internal/v1 is served on that port only."""
    internal_port = get_settings().internal_port
    if internal_port == port:
        raise typer.BadParameter("must differ from PHITUNE_INTERNAL_PORT", param_hint="--port")
    internal = (internal_host, internal_port) if internal_port is not None else None
    grace = get_settings().shutdown_grace_seconds
    serve_asgi("app.main:create_app", host=host, port=port, internal=internal, grace=grace, log_role="api")


def configure_logging(role: str) -> None:
    """phitune's log format (PHITUNE_LOG_FORMAT, PHITUNE_LOG_LEVEL) for this process. Called once uvicorn's
    Config has set up its loggers, so that their lines go out in this format too."""
    from app.log_setup import configure

    settings = get_settings()
    configure(role, settings.log_format, settings.log_level)


# How `phitune api` serves (bench/api.py serves its bare baseline app the same way). No uvicorn access log:
# the app logs its access lines, with their request ids, as PHITUNE_ACCESS_LOG says (app.request_id).
API_SERVER_OPTIONS: dict[str, Any] = {"log_level": "info", "access_log": False}


def serve_asgi(
    factory: str,
    *,
    host: str,
    port: int,
    internal: tuple[str, int] | None = None,
    grace: float | None = None,
    log_role: str | None = None,
) -> None:
    """Serve the ASGI app that `factory` ("module:function") makes with uvicorn, as `phitune api` does; also
    on the `internal` (host, port) if given; logging as `log_role` in phitune's format if given. SIGTERM /
    SIGINT: stop accepting, end the app's live streams (`app.state.drain`), let requests in flight finish for
    up to `grace` seconds, exit 0."""
    import uvicorn

    from phitune.asgi_server import DrainingServer

    made: dict[str, Any] = {}
    make_app = functools.partial(_make_and_freeze, factory, made)
    # One server on two sockets rather than two servers: one process, one lifespan (housekeeping, key cache),
    # one graceful shutdown. The app tells the sockets apart by port (app.internal.listener).
    options = {**API_SERVER_OPTIONS, "timeout_graceful_shutdown": grace}
    config = uvicorn.Config(make_app, factory=True, host=host, port=port, **options)
    if log_role is not None:
        configure_logging(log_role)
    sockets = [config.bind_socket()]
    if internal is not None:
        sockets.append(uvicorn.Config(make_app, host=internal[0], port=internal[1]).bind_socket())
    server = DrainingServer(config, drain=lambda: _drain(made.get("app")))
    # uvicorn raises the signal that stopped it again once it is done: a stop asked for is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure status, as uvicorn.run exits with


def _drain(app: Any) -> None:
    if (drain := getattr(getattr(app, "state", None), "drain", None)) is not None:
        drain()


def _make_and_freeze(factory: str, made: dict[str, Any]) -> Any:
    """The app, then everything made so far (modules, routes, schemas: the process's life) frozen out of the
    cyclic garbage collector: a full collection then walks only what requests left behind. Unfrozen, each
    took ~110 ms under 2,000 requests/s, a stall for every request in flight (`python -m bench api`)."""
    from uvicorn.importer import import_from_string

    app = made["app"] = import_from_string(factory)()
    gc.collect()
    gc.freeze()
    return app


def use_gpus(gpu: int | None, count: int = 1) -> None:
    """Pin this process to `count` GPUs from `gpu` on before torch loads, and fail now if PHITUNE_DEVICE=cuda
    cannot be met."""
    from worker.devices import VISIBLE, pin_gpus

    try:
        os.environ[VISIBLE] = pin_gpus(os.environ, gpu, count)
    except ValueError as problem:
        raise typer.BadParameter(str(problem), param_hint="--gpu") from None
    if get_settings().device == "cuda":
        from worker.hardware import cuda_problem

        if unusable := cuda_problem():
            fail(f"PHITUNE_DEVICE=cuda, but CUDA cannot be used: {unusable}")


def inference(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8001,
    gpu: Gpu = None,
) -> None:
    """Run the inference server: base models loaded once, adapters on demand, batched generation."""
    configure_logging("inference")
    require_extras("serve")
    use_gpus(gpu)
    import uvicorn

    from worker.bootstrap import ensure_tiny_model
    from worker.serving.server import create_inference_app

    settings = get_settings()
    ensure_tiny_model(settings)
    config = uvicorn.Config(create_inference_app(settings), host=host, port=port, log_level="info")
    configure_logging("inference")
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run exits


def worker(
    gpu: Gpu = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated broker queues to take jobs from (default: PHITUNE_WORKER_QUEUES, else "
            "training); see PHITUNE_TRAINING_QUEUES."
        ),
    ] = None,
) -> None:
    """Run a Celery training worker (one job at a time) on PHITUNE_WORKER_DEVICES GPUs (default one)."""
    from app.config import QUEUE_NAME

    worker_queues = queues if queues is not None else get_settings().worker_queues
    if not re.fullmatch(rf"{QUEUE_NAME}(,{QUEUE_NAME})*", worker_queues):
        raise typer.BadParameter(
            "comma-separated queue names, each letters, digits, '.', '_' or '-' (at most 100)",
            param_hint="--queues",
        )
    configure_logging("worker")  # again once Celery starts (worker.celery_app), the libraries loaded
    require_extras("train")
    use_gpus(gpu, get_settings().worker_devices)  # a job's ranks each take one (worker.distributed)
    from worker.bootstrap import ensure_tiny_model

    ensure_tiny_model(get_settings())
    # The recipe imports torch, transformers, peft and TRL (about 5 s here): pay that at start, not on the
    # first job, which would otherwise train that much later (bench/service.py's cold overhead).
    importlib.import_module("worker.recipe")
    from worker.celery_app import celery_app

    # Celery's start-up banner is printed, not logged: a JSON log has no place for it (`celery --quiet`).
    quiet = ["--quiet"] if get_settings().log_format == "json" else []
    celery_app.worker_main(
        [
            *quiet,
            "worker",
            "--pool=solo",  # one job per process, one process per GPU
            f"--queues={worker_queues}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname=phitune-worker@%h",
        ]
    )


def serve(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The API's port.")] = 8000,
    inference_port: Annotated[int, typer.Option(help="The inference server's port.")] = 8001,
) -> None:
    """All in one: migrate, then run the API, a worker and the inference server until Ctrl-C / SIGTERM.

    A child that dies is restarted (with backoff) while the others keep running.
    """
    require_extras("train", "serve")
    from phitune.launch import phitune_command
    from phitune.supervisor import Child, Supervisor
    from worker.bootstrap import ensure_tiny_model
    from worker.devices import gpu_assignment, visible_gpus

    settings = get_settings()
    migrate()
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
        on_started=lambda: typer.echo(f"phitune is serving on http://{reachable}:{port} (Ctrl-C stops it)")
    )
