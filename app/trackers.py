"""Which experiment trackers this deployment offers to the jobs that name them in training_config.report_to.

A job only names trackers. Where each one sends data is the deployment's setting (`PHITUNE_MLFLOW_*`,
`PHITUNE_WANDB_PROJECT`, `PHITUNE_TENSORBOARD_DIR`), with credentials in the worker's environment, so a
tenant cannot make a worker send anything anywhere. The API refuses a tracker the deployment does not offer
when the job is created; the worker checks again (`worker.trackers`), with what only it can see.
"""

from __future__ import annotations

from collections.abc import Iterable

from app.config import Settings
from app.specs import TRACKERS

# The setting that turns a tracker on. TensorBoard writes to the worker's own disk: always offered.
ENABLING_SETTINGS = {"mlflow": "mlflow_tracking_uri", "wandb": "wandb_project"}


def offered(settings: Settings) -> list[str]:
    """The trackers a job may name on this deployment."""
    return [
        name
        for name in TRACKERS
        if name not in ENABLING_SETTINGS or getattr(settings, ENABLING_SETTINGS[name])
    ]


def check_offered(report_to: Iterable[str], settings: Settings) -> None:
    """ValueError, naming training_config.report_to, for a tracker this deployment does not configure."""
    available = offered(settings)
    for name in report_to:
        if name not in available:
            raise ValueError(
                f"training_config.report_to: '{name}' is not configured on this server "
                f"(PHITUNE_{ENABLING_SETTINGS[name].upper()} is unset); it offers {', '.join(available)}"
            )
