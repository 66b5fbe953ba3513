"""Continuing from a previous model: `training_config.init_from` (or OpenAI's `model: "ft:…"`) names one of
the tenant's fine-tuned models or checkpoints, whose LoRA weights the job trains on from.

The job's `model` stays the base model: the worker loads it, and the adapter the job ships is whole over it
(not a delta on its source), so the new model's name and `parent` name the base; `init_from` names the
source. The job takes the source's LoRA settings so that its weights fit; only the CONTINUATION_FIELDS may
differ. The worker fetches the source's adapter through its attempt (`source_artifact`): once the source is
deleted, a job that has not saved a resume state yet fails, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import InvalidRequest, ModelNotAvailable, NotFound
from app.jobs.schemas import JobCreate
from app.models import Artifact, Job
from app.models_api.service import FineTuned, find_fine_tuned
from app.repositories import artifacts as stored
from app.specs import CONTINUATION_FIELDS, PeftConfig

FIELD = "training_config.init_from"
CODE = "incompatible_init_from"


@dataclass(frozen=True)
class Start:
    """Where a job starts: its base model, and the fine-tuned model it continues from (by name), if any."""

    base_model: str
    name: str | None = None
    source: FineTuned | None = None

    def peft_config(self, given: PeftConfig | None) -> PeftConfig:
        """The job's LoRA settings: the source's, with the CONTINUATION_FIELDS `given` sets; any other field
        set to another value than the source's is a 400 naming it."""
        if self.source is None:
            return given or PeftConfig()
        try:
            inherited = PeftConfig.model_validate(self.source.job.peft_config)
        except ValidationError:  # trained under rules this server has since tightened
            raise InvalidRequest(
                f"'{self.name}' was trained with LoRA settings this server no longer accepts; it cannot be "
                "continued",
                param=FIELD,
                code=CODE,
            ) from None
        changes: dict[str, Any] = {}
        for field, value in sorted((given.model_dump(exclude_unset=True) if given else {}).items()):
            if field in CONTINUATION_FIELDS:
                changes[field] = value
            elif value != getattr(inherited, field):
                raise InvalidRequest(
                    f"peft_config.{field} is {value!r}, but '{self.name}' was trained with "
                    f"{getattr(inherited, field)!r}: a job continuing from an adapter keeps its LoRA "
                    f"settings (all but {', '.join(sorted(CONTINUATION_FIELDS))}); leave peft_config.{field} "
                    "out",
                    param=f"peft_config.{field}",
                    code=CODE,
                )
        try:
            return PeftConfig.model_validate({**inherited.model_dump(), **changes})
        except ValidationError as refusal:  # QLoRA asked of a loralib adapter
            message = refusal.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidRequest(message, param="peft_config", code=CODE) from None


def starting_point(session: Session, tenant_id: str, request: JobCreate, settings: Settings) -> Start:
    """The job's base model and source, from `model` (a base model, or a fine-tuned one to continue from)
    and `training_config.init_from`. 404 for a source the tenant cannot call (another tenant's, deleted,
    unknown: one answer), 400 for one of another base model."""
    given = request.training_config.init_from if request.training_config else None
    if request.model in settings.resolved_base_models:
        if given is None:
            return Start(request.model)
        source = _source(session, tenant_id, given, FIELD, settings)
        if source.job.model != request.model:
            raise InvalidRequest(
                f"'{given}' was trained on '{source.job.model}', not on this job's model '{request.model}': "
                "an adapter trains on only over its own base model",
                param=FIELD,
                code=CODE,
            )
        return Start(request.model, given, source)
    if not request.model.startswith("ft:"):
        available = ", ".join(sorted(settings.resolved_base_models))
        raise ModelNotAvailable(
            f"Model '{request.model}' is not configured on this server; available: {available}", param="model"
        )
    if given is not None and given != request.model:
        raise InvalidRequest(
            f"'model' is '{request.model}' but '{FIELD}' is '{given}'; name the model to continue from once",
            param=FIELD,
            code="conflicting_parameters",
        )
    source = _source(session, tenant_id, request.model, "model", settings)
    return Start(source.job.model, request.model, source)


def _source(session: Session, tenant_id: str, name: str, param: str, settings: Settings) -> FineTuned:
    if name in settings.resolved_base_models:
        raise InvalidRequest(
            f"'{name}' is a base model: {FIELD} takes a fine-tuned model (ft:…) or checkpoint id; "
            "to train from the base model, leave it out",
            param=param,
            code="invalid_value",
        )
    source = find_fine_tuned(session, tenant_id, name)
    if source is None:
        raise NotFound(
            f"The model '{name}' does not exist or you do not have access to it.",
            param=param,
            code="model_not_found",
        )
    if source.job.model not in settings.resolved_base_models:
        raise ModelNotAvailable(
            f"'{name}' was trained on '{source.job.model}', which is no longer configured on this server",
            param=param,
        )
    return source


def source_artifact(session: Session, job: Job) -> Artifact:
    """The archive of the adapter `job` continues from, in the format its backend loads. 404 when the job
    continues from none, or its source has been deleted (or was a checkpoint since pruned)."""
    name = job.training_config.get("init_from")
    source = find_fine_tuned(session, job.tenant_id, name) if name else None
    artifact = None
    if source is not None:
        artifact = stored.find_artifact(session, source.job.id, source.scope, job.peft_config["backend"])
    if artifact is None:
        raise NotFound(
            f"Job {job.id} continues from '{name}', which was deleted after the job was created"
            if name
            else f"Job {job.id} continues from no model ({FIELD} is not set)",
            param=FIELD,
            code="model_not_found",
        )
    return artifact
