"""Settings, read from `PHITUNE_*` environment variables.

The defaults make an embedded deployment that needs no server: SQLite and a filesystem Celery transport
under the data directory, and the locally generated tiny Phi-3 as the only base model.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.limits import MAX_COMPLETION_TOKENS

TINY_MODEL_ID = "tiny-phi3"
# The service-to-service secrets (app.service_auth), each generated into the data dir when not configured;
# SecretStr, so that no repr or log of the settings shows them.
SECRETS = ("worker_token", "serving_token", "inference_token", "attempt_key")
# A broker queue's name: also a Redis key, so nothing that needs quoting.
QUEUE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PHITUNE_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(
        Path(".phitune"), description="Where the embedded database, broker and storage live."
    )
    storage_url: str | None = Field(
        None,
        pattern=r"^s3://[A-Za-z0-9._-]{1,255}(/[^?#]*)?$",  # boto3 refuses other bucket names on every call
        description="Where datasets, checkpoints, resume states and adapters are stored: s3://bucket/prefix "
        "(needs phitune[s3]); default: the storage/ directory in data_dir.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="The S3 endpoint (MinIO, Ceph, R2); default: AWS, or AWS_ENDPOINT_URL."
    )
    s3_region: str | None = Field(
        None, description="The S3 region; default: AWS_REGION or AWS_DEFAULT_REGION."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    broker_url: str | None = Field(
        None, description="Celery broker; default: filesystem transport in data_dir."
    )
    broker_key_prefix: str = Field("", description="Prefix for every Redis key the broker writes.")
    base_models: dict[str, str] = Field(
        default_factory=dict,
        description='JSON map of model id -> local path or hub id, e.g. {"phi-3-mini": "/models/phi3"}.',
    )
    training_queues: dict[str, Annotated[str, Field(pattern=rf"^{QUEUE_NAME}$")]] = Field(
        default_factory=dict,
        description="JSON map of base model id -> the broker queue its jobs' and exports' messages go to, "
        'e.g. {"phi-3-medium": "a100"}; a model not named goes to `training`.',
    )
    worker_queues: str = Field(
        "training",
        pattern=rf"^{QUEUE_NAME}(,{QUEUE_NAME})*$",
        description="Comma-separated queues a `phitune worker` takes messages from (its --queues).",
    )
    api_key_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="How long the API trusts a key it found valid before checking it again: a revoked key "
        "stops working within this time (0: checked on every request).",
    )
    admin_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="Bearer key of the admin API (/v1/admin: tenants' keys), at least 32 characters; unset: "
        "the admin API is off (401).",
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0, description="Largest accepted dataset file.")
    max_request_body_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest body of any other request (JSON): a larger one is a 413, read no further.",
    )
    # Limits per key and per tenant (README "Limits per key and per tenant"); 0 turns one off.
    rate_limit_per_minute: float = Field(
        600.0,
        ge=0,
        description="Requests an API key may make per minute in one API process, on average (a token bucket; "
        "beyond it a 429 with Retry-After); 0: no limit.",
    )
    rate_limit_burst: int = Field(
        120, gt=0, description="Requests an API key may make at once before its rate applies (bucket size)."
    )
    max_active_jobs_per_tenant: int = Field(
        16,
        ge=0,
        description="Unfinished (queued, running or paused) jobs a tenant may have; creating one more is a "
        "429; 0: no limit.",
    )
    max_stored_bytes_per_tenant: int = Field(
        100 * 1024**3,
        ge=0,
        description="Bytes a tenant may store (its files and its jobs' adapter archives); an upload that "
        "would pass it is a 413; 0: no limit.",
    )
    max_event_streams_per_tenant: int = Field(
        64,
        ge=0,
        description="Live event streams (?stream=true) a tenant may hold open in one API process; one more "
        "is a 429; 0: no limit.",
    )
    max_prompt_chars: int = Field(
        1024 * 1024,
        gt=0,
        description="Characters of a chat request's messages together; longer is a 400 before the inference "
        "server tokenises any of it.",
    )
    max_completion_tokens: int = Field(
        MAX_COMPLETION_TOKENS,
        gt=0,
        le=MAX_COMPLETION_TOKENS,
        description="Largest max_tokens (max_completion_tokens) a chat request may ask for.",
    )
    api_url: str = Field("http://127.0.0.1:8000", description="Where workers reach the API.")
    inference_url: str = Field(
        "http://127.0.0.1:8001", description="Where the API reaches the inference server."
    )
    inference_timeout_seconds: float = Field(600.0, gt=0, description="Longest wait for one completion.")
    inference_engine: Literal["phitune", "vllm"] = Field(
        "phitune",
        description="What serves chat at inference_url: phitune (`phitune inference`) or vllm (a vLLM "
        "OpenAI server started with --enable-lora and runtime LoRA updating; see app.inference).",
    )
    vllm_adapter_dir: Path | None = Field(
        None,
        description="With the vllm engine: where the API unpacks adapters for vLLM to load, a directory "
        "vLLM reads at the same path; default: vllm-adapters/ in data_dir.",
    )
    max_loaded_adapters: int = Field(8, gt=0, description="Adapters the inference server keeps in memory.")
    worker_token: SecretStr | None = Field(
        None,
        description="Shared secret workers claim jobs with (and do nothing else with); default: generated.",
    )
    serving_token: SecretStr | None = Field(
        None,
        description="Secret the inference server downloads adapters from the API with (and does nothing else "
        "with); default: generated.",
    )
    inference_token: SecretStr | None = Field(
        None, description="Secret the API calls the inference server with; default: generated."
    )
    attempt_key: SecretStr | None = Field(
        None,
        description="Secret only the API holds, which attempt tokens are derived from, so that it tells a "
        "superseded attempt's token (409) from a forged one (401); default: generated.",
    )
    internal_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Serve /internal/v1 (workers, the inference server) on this port only, not on the public "
        "one; `phitune api` then listens on both. Point PHITUNE_API_URL at it.",
    )
    lease_seconds: int = Field(
        120,
        gt=0,
        description="A running job whose worker is silent this long is re-queued (3 attempts at most).",
    )
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker renews its lease.")
    housekeeping_seconds: float = Field(
        5.0,
        gt=0,
        description="How often the API's housekeeping loop runs: expired leases reaped, unsent or lost job "
        "messages sent, resume states of ended jobs deleted.",
    )
    redeliver_seconds: float = Field(
        60.0, gt=0, description="A job queued this long while the broker holds no message is sent again."
    )
    resume_state_seconds: float = Field(
        600.0, gt=0, description="A running job stores a resume state at least this often, and at save_steps."
    )
    max_job_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="An attempt that trains longer than this fails (job time limit)."
    )
    export_max_shard_size: str = Field(
        "5GB",
        pattern=r"^[0-9]+(B|KB|MB|GB|KiB|MiB|GiB)?$",
        description="The largest safetensors shard of a merged-model export (transformers' max_shard_size).",
    )
    estimate_tokens_per_second: float | None = Field(
        None,
        gt=0,
        description="A dry run's training throughput (tokens/s) until a job on the base model has succeeded "
        "and measured its own (see app.jobs.estimate).",
    )
    worker_devices: int = Field(
        1,
        ge=1,
        description="The devices a training worker owns (GPUs from --gpu on, or gloo processes on the CPU): "
        "the most processes a job's training_config.num_processes may ask of it.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Where the worker trains and the inference server serves: cuda fails when CUDA cannot be "
        "used; auto falls back to the CPU, with a warning, only for small models (see worker.hardware).",
    )
    # Experiment trackers (app.trackers): a job only names one in training_config.report_to.
    mlflow_tracking_uri: str | None = Field(
        None,
        description="The MLflow tracking server (or store URI) of jobs whose report_to names mlflow; unset: "
        "such jobs are refused. Credentials, if the server needs them, go in the worker's MLFLOW_TRACKING_* "
        "environment variables, not here.",
    )
    mlflow_experiment_name: str = Field(
        "phitune", min_length=1, description="The MLflow experiment each job's run is created in."
    )
    wandb_project: str | None = Field(
        None,
        description="The W&B project of jobs whose report_to names wandb; unset: such jobs are refused. The "
        "worker needs the wandb package and WANDB_API_KEY (or WANDB_MODE=offline).",
    )
    tensorboard_dir: Path | None = Field(
        None,
        description="Where the worker writes the TensorBoard logs of jobs whose report_to names tensorboard, "
        "a directory per job; default: tensorboard/ in data_dir.",
    )
    stop_grace_seconds: float = Field(
        60.0,
        gt=0,
        description="How long `phitune serve` lets its worker stop (and save its training state) after "
        "SIGTERM before killing it; the API and the inference server get at most 15 s.",
    )
    shutdown_grace_seconds: float = Field(
        10.0,
        gt=0,
        description="After SIGTERM the API stops accepting, ends live event streams with a final event and "
        "lets requests in flight finish for up to this long before closing them.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object a line (for log collectors); `text`: for a terminal."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="The lowest level of the lines logged."
    )
    access_log: Literal["all", "writes", "off"] = Field(
        "writes",
        description="Which API requests get an access line (with their request id): `writes`, every request "
        "but GET, HEAD and OPTIONS (pollers would fill the log, and a line costs ~5 % of a poll's CPU); "
        "`all`; `off`.",
    )
    worker_metrics_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Where a training worker serves Prometheus /metrics (one port per worker process); "
        "unset: no metrics server.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=60, description="Longest wait for a webhook endpoint to answer one delivery attempt."
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often the API's webhook sender looks for deliveries that are due."
    )
    webhook_retry_seconds: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        max_length=32,
        description="JSON list: the wait after each failed webhook delivery attempt before the next one "
        "(each varied by up to 20% at random); once the list is used up the delivery is marked failed. "
        "Default as Standard Webhooks suggest: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (8 attempts, ~27 h).",
    )
    webhook_allow_private_urls: bool = Field(
        False,
        description="Let webhooks reach loopback, private, link-local and other non-public addresses "
        "(refused by default: a tenant could otherwise make the API call into its own network).",
    )

    @property
    def resolved_database_url(self) -> str:
        # Read on every request: the path is resolved once per (working directory, data_dir).
        return self.database_url or _sqlite_url(os.getcwd(), self.data_dir)

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def storage_dir(self) -> Path:
        return (self.data_dir / "storage").resolve()

    @property
    def resolved_tensorboard_dir(self) -> Path:
        return (self.tensorboard_dir or self.data_dir / "tensorboard").resolve()

    @property
    def tiny_model_dir(self) -> Path:
        return (self.data_dir / "models" / TINY_MODEL_ID).resolve()

    @property
    def resolved_base_models(self) -> dict[str, str]:
        """Configured base models; the generated tiny Phi-3 when none are configured."""
        return self.base_models or {TINY_MODEL_ID: str(self.tiny_model_dir)}

    @model_validator(mode="after")
    def _distinct_secrets(self) -> Settings:
        """Each secret is good for one thing only, which a secret configured twice would undo. The admin key
        (never generated) is checked too, when set: equal to a service token, it would give that service's
        every process the admin API."""
        names = (*SECRETS, "admin_key")
        seen: dict[str, str] = {}
        for name in names:
            if not (secret := getattr(self, name)):
                continue
            if (other := seen.setdefault(secret.get_secret_value(), name)) != name:
                raise ValueError(
                    f"PHITUNE_{other.upper()} and PHITUNE_{name.upper()} are the same secret: "
                    f"{', '.join(f'PHITUNE_{each.upper()}' for each in names)} must all differ"
                )
        return self

    @cached_property
    def resolved_worker_token(self) -> str:
        return self.resolved_secret("worker_token")

    @cached_property
    def resolved_serving_token(self) -> str:
        return self.resolved_secret("serving_token")

    @cached_property
    def resolved_inference_token(self) -> str:
        return self.resolved_secret("inference_token")

    @cached_property
    def resolved_attempt_key(self) -> str:
        return self.resolved_secret("attempt_key")

    def resolved_secret(self, name: str) -> str:
        """The secret configured as `name` (one of SECRETS), else one generated into data_dir/`name`, which
        every process of an embedded deployment shares."""
        if configured := getattr(self, name):
            return configured.get_secret_value()
        path = self.data_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{secrets.token_hex(4)}")
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.chmod(0o600)
            # link() fails if another process won the race, so every process reads the same secret.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
        return path.read_text().strip()


@lru_cache(maxsize=16)
def _sqlite_url(cwd: str, data_dir: Path) -> str:
    return f"sqlite:///{(Path(cwd) / data_dir / 'phitune.db').resolve()}"


def get_settings() -> Settings:
    """A fresh read of the environment (tests and child processes change it)."""
    return Settings()
