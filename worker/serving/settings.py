"""Settings of the inference server beyond `app.config.Settings`, read from `PHITUNE_INFERENCE_*`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PHITUNE_INFERENCE_", extra="ignore")

    torch_threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads per forward pass on a CPU-only machine; default 1. The model server shares "
        "the cores with the API and the training worker, and an OpenMP team with one busy core stalls every "
        "op: the tiny model decoded 15x slower with 2 threads than with 1 while another process ran.",
    )
    max_batch_size: int = Field(32, gt=0, description="Sequences decoded together, at most.")
    batch_window_ms: float = Field(
        2.0, ge=0, description="How long an idle engine waits for more requests to share a first step."
    )
