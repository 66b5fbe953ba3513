"""`phitune jobs watch`: a job's live event stream drawn as a progress bar with its metrics, then its outcome.

Metrics events carry `step, total_steps, epoch, train_loss, learning_rate, tokens_per_second` and, on the
steps that were evaluated, `eval_loss` (worker.recipe's progress callback); messages are printed as they come.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from app.job_status import JobStatus
from phitune.cli.output import console, printable
from phitune.client import Client, json_object

LEVEL_STYLES = {"warn": "yellow", "error": "red"}


@dataclass
class TrainingProgress:
    """What the metrics events said so far; enough to draw the bar and estimate the time left."""

    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    # (created_at, step) of the first metrics event seen: the rate of steps, for the ETA, is measured from
    # the server's timestamps, so it holds when a watch starts late and reads the backlog in one go.
    first: tuple[int, int] | None = None
    last_at: int | None = None

    def update(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if "step" not in data:
            return
        self.step, self.total_steps = data["step"], data.get("total_steps") or self.total_steps
        self.epoch = data.get("epoch", self.epoch)
        self.train_loss = data.get("train_loss", self.train_loss)
        self.eval_loss = data.get("eval_loss", self.eval_loss)
        self.tokens_per_second = data.get("tokens_per_second", self.tokens_per_second)
        self.first = self.first or (event["created_at"], self.step)
        self.last_at = event["created_at"]

    def eta(self) -> str:
        if not (self.first and self.last_at and self.total_steps) or self.step <= self.first[1]:
            return "-"
        per_step = (self.last_at - self.first[0]) / (self.step - self.first[1])
        return str(timedelta(seconds=round(per_step * max(self.total_steps - self.step, 0))))

    def render(self) -> Group:
        total = self.total_steps or 0
        bar = Table.grid(padding=(0, 2))
        bar.add_row(
            ProgressBar(total=total or None, completed=self.step, width=40),
            f"step {self.step}/{total or '?'}",
            f"{100 * self.step / total:.0f}%" if total else "",
            f"ETA {self.eta()}",
        )
        stats = [
            f"epoch {_number(self.epoch, '.2f')}",
            f"train loss {_number(self.train_loss, '.4f')}",
            f"eval loss {_number(self.eval_loss, '.4f')}",
            f"{_number(self.tokens_per_second, ',.0f')} tokens/s",
        ]
        return Group(bar, Text("   ".join(stats), style="cyan"))


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def follow(client: Client, job_id: str, progress: TrainingProgress, shown: Console) -> None:
    """Read the job's live events until the stream's final `{}` (or until the server closes it)."""
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    for data in client.events("GET", path, params={"stream": "true"}):
        if data == "{}":  # the job is final and this was its last event
            return
        event = json_object(data)
        if event.get("type") == "metrics":
            progress.update(event)
        else:
            style = LEVEL_STYLES.get(event.get("level", "info"), "")
            shown.print(Text(f"  {printable(str(event.get('message', '')))}", style=style))


def watch(client: Client, job_id: str, shown: Console = console) -> dict[str, Any]:
    """Draw the job's progress live (on `shown`: stdout, or stderr under --json) until it ends; returns the
    job as it ended."""
    progress = TrainingProgress()
    with Live(console=shown, refresh_per_second=4, get_renderable=progress.render):
        follow(client, job_id, progress, shown)
    if not shown.is_terminal:  # Live ends its last frame with a newline on a terminal only
        shown.line()
    return client.get(f"/v1/fine_tuning/jobs/{job_id}")


def outcome(job: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the job succeeded, and the lines that say how it ended and what to do next."""
    status = JobStatus(job["status"])
    took = f" in {job['finished_at'] - job['created_at']} s" if job.get("finished_at") else ""
    if status == JobStatus.SUCCEEDED:
        model = job["fine_tuned_model"]
        tokens = f", {job['trained_tokens']:,} tokens trained" if job.get("trained_tokens") else ""
        return True, [
            f"✔ {job['id']} succeeded{took}{tokens}: {model}",
            f"  download the adapter:  phitune jobs download {job['id']}",
            f'  chat with the model:   phitune chat {model} "Hello!"',
        ]
    if status == JobStatus.FAILED:
        error = job.get("error") or {}
        return False, [
            f"✘ {job['id']} failed{took}: {error.get('message', 'no reason given')} ({error.get('code')})"
        ]
    if not status.is_final:
        return False, [
            f"… {job['id']} is {status.value}: watch it again with  phitune jobs watch {job['id']}"
        ]
    return False, [f"✘ {job['id']} was {status.value}{took}"]
