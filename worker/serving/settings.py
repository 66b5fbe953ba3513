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
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="KV cache budget per base model, in tokens: the cache allocated when the server starts "
        "and what requests are admitted against (each reserves its prompt plus max_tokens). Default: what "
        "fits in 80% of the GPU memory free once the model is loaded (in 4 GiB on the CPU), at most "
        "max_batch_size full contexts. Below the model's context, it also caps the context accepted.",
    )
    gpu_memory_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Without max_batch_tokens, the KV cache takes this share of the GPU memory free once the "
        "model is loaded. `phitune serve` sets 0.25 when its worker trains on the same GPU.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        gt=0,
        description="Prompt tokens prefilled per forward pass, padding included: a long prompt is prefilled "
        "in chunks, between decode steps of the running sequences, rather than stalling them.",
    )
    batch_window_ms: float = Field(
        2.0, ge=0, description="How long an idle engine waits for more requests to share a first step."
    )
    host_adapter_cache_mb: int = Field(
        1024,
        ge=0,
        description="MiB of host memory for the weights of recently used adapters, beyond the loaded ones: "
        "reloading one skips the download, extraction and read. 0 turns it off (a reload fetches again).",
    )
