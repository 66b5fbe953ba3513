"""`phitune jobs`: create fine-tuning jobs, follow, pause, resume or cancel them, read their events and
checkpoints, and download their adapters (/v1/fine_tuning/jobs)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.text import Text

from app.adapter_format import Format
from phitune.cli import options, recipe, watch
from phitune.cli.options import After, ApiKey, BaseUrl, Force, Json, Limit, Output, connected
from phitune.cli.output import answer, console, iso, notes, print_json, print_page, print_table, printable
from phitune.client import DEFAULT_BASE_URL, Client, json_object

app = typer.Typer(
    help="Fine-tuning jobs: create, watch, pause, resume, cancel; events, checkpoints, adapters.",
    no_args_is_help=True,
)
JobId = Annotated[str, typer.Argument(help="ftjob-…")]
COLUMNS = ("ID", "STATUS", "MODEL", "PROGRESS", "FINE-TUNED MODEL", "CREATED")
JOBS = "/v1/fine_tuning/jobs"


def row(job: dict[str, Any]) -> tuple[Any, ...]:
    progress = job["progress"]
    steps = f"{progress['step']}/{progress['total_steps'] or '?'} ({progress['percent']:g}%)"
    return (job["id"], job["status"], job["model"], steps, job["fine_tuned_model"], iso(job["created_at"]))


def show(job: dict[str, Any]) -> None:
    print_table(COLUMNS, [row(job)])
    if job.get("error"):
        error = printable(f"error: {job['error']['message']} ({job['error']['code']})")
        console.print(Text(error, style="red"))
    for file_id in job.get("result_files") or []:
        console.print(f"metrics by step (CSV): phitune files download {printable(file_id)}")


def dataset_id(client: Client, value: str) -> str:
    """A file id as it is, or a local dataset uploaded first (what a user has at hand is often the file)."""
    path = Path(value)
    if value.startswith("file-") or not path.is_file():
        return value
    file = client.upload(path, "fine-tune")
    notes.print(f"Uploaded {path.name}: {file['stats']['examples']} examples ({file['id']})")
    return file["id"]


def metadata_pairs(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    if bad := [pair for pair in pairs if "=" not in pair]:
        raise typer.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}", param_hint="--metadata")
    return dict(pair.split("=", 1) for pair in pairs)


@app.command()
def create(
    model: Annotated[str, typer.Option(help="A base model id (`phitune models list`).")],
    training_file: Annotated[str, typer.Option(help="A file id, or a local JSONL file to upload first.")],
    validation_file: Annotated[str | None, typer.Option(help="A file id, or a local JSONL file.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A JSON or YAML recipe holding training_config and/or peft_config.", dir_okay=False
        ),
    ] = None,
    training_config: Annotated[
        str | None, typer.Option(help="training_config as a JSON object; its keys win over --config's.")
    ] = None,
    peft_config: Annotated[
        str | None, typer.Option(help="peft_config as a JSON object; its keys win over --config's.")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="The training seed.")] = None,
    metadata: Annotated[list[str], typer.Option(help="KEY=VALUE, repeatable.")] = [],  # noqa: B006
    follow: Annotated[
        bool, typer.Option("--watch", help="Then watch it train, as `jobs watch` does.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check and estimate (steps, tokens, time, memory); create nothing."),
    ] = False,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tuning job; the server checks the recipe and says which field is wrong. With --json and
    --watch, the progress goes to stderr and stdout gets the job as it ended, as JSON. With --dry-run, the
    server checks it all the same and answers what the job would take instead of creating it."""
    if dry_run and follow:
        raise typer.BadParameter("a dry run creates no job to watch", param_hint="--watch")
    body: dict[str, Any] = {"model": model, **recipe.recipe(config, training_config, peft_config)}
    if dry_run:
        body["dry_run"] = True
    for key, value in [("suffix", suffix), ("seed", seed), ("metadata", metadata_pairs(metadata))]:
        if value is not None:
            body[key] = value
    with connected(base_url, api_key) as client:
        body["training_file"] = dataset_id(client, training_file)
        if validation_file is not None:
            body["validation_file"] = dataset_id(client, validation_file)
        job = client.post(JOBS, body)
        if dry_run:
            answer(job, as_json, show_estimate)
            return
        if not follow:
            answer(job, as_json, lambda job: console.print(f"Created {job['id']} ({job['status']})"))
            return
        (notes if as_json else console).print(f"Created {job['id']} ({job['status']})")
        watch_until_final(client, job["id"], as_json)


def show_estimate(estimate: dict[str, Any]) -> None:
    """A dry run's answer: what the job would take, and on what basis (which says why a figure is unknown)."""
    config = estimate["training_config"]
    examples = estimate["examples"]
    console.print(
        f"Would train {estimate['model']} on {estimate['training_file']}: "
        f"{'unknown' if examples is None else f'{examples:,}'} examples, "
        f"max_seq_length {config['max_seq_length']}, {config['num_train_epochs']:g} epochs"
    )
    steps, per_epoch = estimate["total_steps"], estimate["steps_per_epoch"]
    tokens = estimate["trained_tokens"]
    seconds, memory = estimate["estimated_seconds"], estimate["estimated_memory_gb"]
    console.print(
        ("Steps unknown" if steps is None else f"Steps {steps:,} ({per_epoch:,} per epoch)")
        + f", tokens {'unknown' if tokens is None else f'{tokens:,}'}"
        + f", time {'unknown' if seconds is None else f'{seconds:g} s'}"
        + f", memory {'unknown' if memory is None else f'{memory:.2f} GiB'}"
    )
    console.print(printable(estimate["basis"]))


def watch_until_final(client: Client, job_id: str, as_json: bool) -> None:
    """Watch the job to its end, then print how it ended; a job that did not succeed fails the command. With
    --json, stdout is the one JSON document of the job as it ended, and what a person reads goes to stderr."""
    shown = notes if as_json else console
    job = watch.watch(client, job_id, shown)
    if as_json:
        print_json(job)
    succeeded, lines = watch.outcome(job)
    for line in lines:
        shown.print(Text(printable(line), style="green" if succeeded else "red"))
    if not succeeded:
        raise typer.Exit(1)


@app.command("watch")
def watch_job(
    job_id: JobId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """Follow a job live (step, epoch, losses, tokens/s, ETA), then its outcome; exit 1 unless it succeeds.
    With --json, the progress goes to stderr and stdout gets the job as it ended."""
    with connected(base_url, api_key) as client:
        watch_until_final(client, job_id, as_json)


@app.command("list")
def list_jobs(
    limit: Limit = 20,
    after: After = None,
    metadata: Annotated[list[str], typer.Option(help="Only jobs with KEY=VALUE, repeatable.")] = [],  # noqa: B006
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """The tenant's jobs, newest first."""
    filters = {f"metadata[{key}]": value for key, value in (metadata_pairs(metadata) or {}).items()}
    show_page = partial(print_page, columns=COLUMNS, row=row)
    options.read(JOBS, as_json, base_url, api_key, show_page, limit=limit, after=after, **filters)


@app.command()
def get(
    job_id: JobId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """One job: its status, progress and, once it succeeded, its model."""
    options.read(f"{JOBS}/{job_id}", as_json, base_url, api_key, show)


def _action(action: str, summary: str) -> None:
    """The command `jobs ACTION ID`: POST …/{id}/ACTION, then the job as the server answered."""

    def command(
        job_id: JobId, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
    ) -> None:
        with connected(base_url, api_key) as client:
            job = client.post(f"{JOBS}/{job_id}/{action}")
        answer(job, as_json, show)

    command.__doc__ = summary
    app.command(action)(command)


_action("cancel", "Cancel a job: a queued one at once, a running one within a logging step.")
_action("pause", "Pause a job: its worker saves the training state and frees the GPU.")
_action("resume", "Resume a paused job from the step it was paused at.")


@app.command()
def events(
    job_id: JobId,
    limit: Limit = 20,
    after: After = None,
    order: Annotated[
        Literal["desc", "asc"], typer.Option(help="desc: newest first, as OpenAI lists them.")
    ] = "desc",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream them live, oldest first, until the job ends.")
    ] = False,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's events: a page of them, or with --follow all of them live (--json: one JSON object a line)."""
    with connected(base_url, api_key) as client:
        if not follow:
            page = client.get(f"{JOBS}/{job_id}/events", limit=limit, after=after, order=order)
            answer(
                page, as_json, lambda page: print_table(EVENT_COLUMNS, [event_row(e) for e in page["data"]])
            )
            return
        params = {"stream": "true", "after": after}
        for data in client.events("GET", f"{JOBS}/{job_id}/events", params=params):
            if data == "{}":
                return
            if as_json:
                typer.echo(data)
            else:
                print_table(EVENT_COLUMNS, [event_row(json_object(data))])


EVENT_COLUMNS = ("CREATED", "LEVEL", "TYPE", "MESSAGE")


def event_row(event: dict[str, Any]) -> tuple[Any, ...]:
    return (iso(event["created_at"]), event["level"], event["type"], event["message"])


@app.command()
def checkpoints(
    job_id: JobId,
    limit: Limit = 10,
    after: After = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """The checkpoints a job stored (`training_config.save_steps`), newest first, each callable by name."""
    show_page = partial(print_page, columns=CHECKPOINT_COLUMNS, row=checkpoint_row)
    options.read(
        f"{JOBS}/{job_id}/checkpoints", as_json, base_url, api_key, show_page, limit=limit, after=after
    )


CHECKPOINT_COLUMNS = ("ID", "STEP", "TRAIN LOSS", "VALID LOSS", "MODEL")


def checkpoint_row(checkpoint: dict[str, Any]) -> tuple[Any, ...]:
    metrics = checkpoint["metrics"]
    return (
        checkpoint["id"],
        checkpoint["step_number"],
        metrics.get("train_loss"),
        metrics.get("valid_loss"),
        checkpoint["fine_tuned_model_checkpoint"],
    )


@app.command()
def download(
    job_id: JobId,
    output: Output = Path("."),
    format: Annotated[Format | None, typer.Option(help="The archive's format (default peft).")] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="An intermediate checkpoint's id (ftckpt-…).")
    ] = None,
    force: Force = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's adapter (.tar.gz: adapter_config.json, adapter_model.safetensors, a model card).
    An existing file is never replaced without --force; Ctrl-C or a failure leaves nothing behind."""
    name = f"{checkpoint or job_id}.{format or 'peft'}.tar.gz"  # if the server names none
    with connected(base_url, api_key) as client:
        path, size = client.download(
            f"{JOBS}/{job_id}/adapter",
            output,
            default_name=name,
            overwrite=force,
            format=format,
            checkpoint=checkpoint,
        )
    console.print(
        f"Saved {path} ({size:,} bytes); extract it and load it with peft.PeftModel.from_pretrained"
    )
