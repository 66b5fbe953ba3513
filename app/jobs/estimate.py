"""`POST /v1/fine_tuning/jobs` with `"dry_run": true`: the job validated and resolved by the very code that
creates one (`service.create_job`, which stores nothing for a dry run), and what it would take: its steps
and tokens (`app.training_plan` on the training file's report, `app.files.report`), its time from the
service's own measured throughput, and its device memory. Nothing is stored, sent or remembered.

Time: `overhead + trained_tokens / rate`, where `rate` is the median training throughput (tokens_per_second
of the metrics events) of the latest succeeded jobs on the same base model, and `overhead` their median time
from start to finish beyond training (loading the model, saving the adapter). Without such a job, the rate
is `PHITUNE_ESTIMATE_TOKENS_PER_SECOND` when set, else there is no time estimate; `basis` says which.
"""

from __future__ import annotations

import statistics
from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import release_connection
from app.files import report
from app.files.service import get_dataset
from app.jobs import service
from app.jobs.schemas import FineTuningJob, JobCreate
from app.models import Job
from app.repositories import jobs, throughput
from app.specs import PeftConfig, TrainingConfig
from app.storage import Storage
from app.training_plan import GIB, PREFERENCE_ROWS, total_steps, training_memory

MEASURED_JOBS = 5  # the latest succeeded jobs whose throughput the estimate takes


class JobEstimate(BaseModel):
    """What a job would be, and take, without creating it."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    training_file: str
    validation_file: str | None
    training_config: dict[str, Any] = Field(description="The resolved TrainingConfig, as the job would get.")
    peft_config: dict[str, Any] = Field(description="The resolved PeftConfig, as the job would get.")
    examples: int | None = Field(description="Training examples the job keeps (with a trained token).")
    steps_per_epoch: int | None
    total_steps: int | None = Field(description="Optimizer steps, as the worker's trainer will count them.")
    trained_tokens: int | None = Field(description="Tokens the job would process (its trained_tokens).")
    estimated_seconds: float | None = Field(description="From start to finish on the worker; see basis.")
    estimated_memory_gb: float | None = Field(description="Device memory in GiB; see basis.")
    basis: str = Field(description="Where the figures come from, or why one is null.")


class JobCreateResponse(RootModel[FineTuningJob | JobEstimate]):
    """What creating a job answers: the job, or for a dry run its estimate."""


def dry_run(
    session: Session, tenant_id: str, request: JobCreate, settings: Settings, storage: Storage
) -> JobEstimate:
    """The estimate of the job `request` would create; the same 4xx as creating it."""
    job = service.create_job(session, tenant_id, request, settings)  # validated, resolved, not stored
    config = TrainingConfig.model_validate(job.training_config)
    peft_config = PeftConfig.model_validate(job.peft_config)
    training_file = get_dataset(session, tenant_id, job.training_file, param="training_file")
    rate, overhead, measured = measured_throughput(session, job.model)
    release_connection(session)  # the report may read a large file: hold no pooled connection meanwhile
    key = report.ReportKey(
        job.model, settings.resolved_base_models[job.model], config.max_seq_length, config.train_on_inputs
    )
    computed = report.dataset_report(storage, training_file, key)
    memory, memory_basis = estimate_memory(job, config, peft_config, settings, computed.kept_lengths)
    estimate = JobEstimate(
        model=job.model,
        training_file=job.training_file,
        validation_file=job.validation_file,
        training_config=job.training_config,
        peft_config=job.peft_config,
        examples=None,
        steps_per_epoch=None,
        total_steps=None,
        trained_tokens=None,
        estimated_seconds=None,
        estimated_memory_gb=memory,
        basis=memory_basis,
    )
    if not computed.kept_lengths:
        why = computed.report["tokens_unavailable"] or "no example has a trained token"
        return estimate.model_copy(update={"basis": f"No steps or time: {why}. {memory_basis}"})
    steps, per_epoch = total_steps(computed.kept_lengths, config)
    tokens = round(sum(computed.kept_lengths) * steps / per_epoch)
    if rate is None and settings.estimate_tokens_per_second:
        rate, overhead = settings.estimate_tokens_per_second, 0.0
        measured = (
            f"PHITUNE_ESTIMATE_TOKENS_PER_SECOND ({rate:g} tokens/s; no succeeded job on {job.model} yet)"
        )
    seconds = None if rate is None else round(overhead + tokens / rate, 1)
    if rate is None:
        time_basis = (
            f"No time: no succeeded job on {job.model} yet, and PHITUNE_ESTIMATE_TOKENS_PER_SECOND unset."
        )
    else:
        time_basis = f"Time from {measured}."
    return estimate.model_copy(
        update={
            "examples": len(computed.kept_lengths),
            "steps_per_epoch": per_epoch,
            "total_steps": steps,
            "trained_tokens": tokens,
            "estimated_seconds": seconds,
            "basis": f"{time_basis} {memory_basis}",
        }
    )


def measured_throughput(session: Session, model: str) -> tuple[float | None, float, str]:
    """The median training throughput (tokens/s) and overhead (s) of the latest succeeded jobs on `model`,
    and a description; (None, 0, "") when there is none."""
    rates, overheads = [], []
    for job in throughput.recent_succeeded(session, model, MEASURED_JOBS):
        speeds = [
            data["tokens_per_second"]
            for data in jobs.metrics_data(session, job.id)
            if data.get("tokens_per_second")
        ]
        if not speeds or not job.trained_tokens:
            continue
        rate = statistics.median(speeds)
        rates.append(rate)
        duration = (job.finished_at or 0) - (job.started_at or 0)  # both set: see recent_succeeded
        overheads.append(max(duration - job.trained_tokens / rate, 0.0))
    if not rates:
        return None, 0.0, ""
    rate, overhead = statistics.median(rates), statistics.median(overheads)
    description = (
        # Of every tenant's jobs (the hardware's speed), so it names no count of them.
        f"the latest succeeded jobs on {model}: {rate:.0f} tokens/s while training, plus "
        f"{overhead:.0f} s to load and save"
    )
    return rate, overhead, description


def estimate_memory(
    job: Job, config: TrainingConfig, peft_config: PeftConfig, settings: Settings, kept_lengths: list[int]
) -> tuple[float | None, str]:
    """The device memory in GiB (`app.training_plan.training_memory` for weights counted from config.json)
    and its basis; a preference job's batch holds PREFERENCE_ROWS rows a pair, as the worker counts it."""
    model_config = service.read_model_config(settings.resolved_base_models[job.model]) or {}
    try:
        shapes = linear_shapes(model_config)
        hidden, layers = model_config["hidden_size"], model_config["num_hidden_layers"]
        vocab = model_config["vocab_size"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None, "No memory estimate: the base model's config.json does not give its dimensions."
    half = settings.device != "cpu"
    linear = layers * sum(inputs * outputs for inputs, outputs in shapes.values())
    embeddings = vocab * hidden * (1 if model_config.get("tie_word_embeddings") else 2)
    bytes_per_weight = {"4bit": 0.5, "8bit": 1.0, None: 2.0 if half else 4.0}[peft_config.quantization]
    trained = layers * sum(
        peft_config.r * (inputs + outputs)
        for name, (inputs, outputs) in shapes.items()
        if _targeted(name, peft_config)
    )
    longest = max(kept_lengths, default=config.max_seq_length)
    memory = training_memory(
        weight_bytes=int(linear * bytes_per_weight + embeddings * (2 if half else 4) + trained * 4),
        trained_parameters=trained,
        batch_size=config.per_device_train_batch_size * (PREFERENCE_ROWS if job.method else 1),
        sequence_length=config.max_seq_length if config.packing else min(longest, config.max_seq_length),
        hidden_size=hidden,
        layers=layers,
        vocab_size=vocab,
        half_precision=half,
        checkpointing=bool(config.gradient_checkpointing),
    )
    precision = "half precision, as on a GPU" if half else "fp32, as on the CPU (PHITUNE_DEVICE=cpu)"
    return round(memory.total / GIB, 3), f"Memory: the worker's estimate ({precision}), {memory.describe()}."


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer, by name, from config.json: Phi-3 fuses
    the query, key and value projections, and the gate and up ones; Llama-like models do not."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inner = config["intermediate_size"]
    if config.get("model_type") == "phi3":
        return {
            "qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_up_proj": (hidden, 2 * inner),
            "down_proj": (inner, hidden),
        }
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def _targeted(name: str, peft_config: PeftConfig) -> bool:
    targets = peft_config.target_modules
    return targets == "all-linear" or any(target.rsplit(".", 1)[-1] == name for target in targets)
