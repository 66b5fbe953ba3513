"""The `phitune` command: one Typer app. The process commands run phitune on this machine; `files`, `jobs`,
`models` and `chat` talk to a phitune API over HTTP; `keys` does either (see phitune.cli.keys)."""

from __future__ import annotations

import typer

from phitune.cli import chat, exports, files, jobs, keys, models, processes

# rich_markup_mode=None: errors are printed as plain `Error: …` lines that scripts can match, never wrapped
# into a panel at the terminal's width (Typer's rich mode does both help and errors, or neither).
app = typer.Typer(
    help="phitune: LoRA fine-tuning of Phi-3 behind an OpenAI-compatible API.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(processes.serve)
app.command()(processes.api)
app.command()(processes.worker)
app.command()(processes.inference)
app.command()(processes.migrate)
app.command("make-tiny-model")(processes.make_tiny_model)
app.add_typer(files.app, name="files")
jobs.app.command()(exports.export)
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="models")
app.command()(chat.chat)
app.add_typer(keys.app, name="keys")


def main() -> None:
    app()
