"""First-use set-up of a worker's data directory: the tiny base model of the embedded default."""

from __future__ import annotations

import os
import secrets
import shutil

from app.config import Settings


def ensure_tiny_model(settings: Settings) -> None:
    """Generate the tiny Phi-3 when it is the base model and missing, so a fresh data dir just works."""
    if settings.base_models:
        return
    target = settings.tiny_model_dir
    if (target / "config.json").exists():
        return
    from worker.tiny_model import make_tiny_model

    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
    make_tiny_model(staging)
    try:
        os.rename(staging, target)  # atomic; another process may have won the race, which is fine
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
