"""The bounds of what a request may hold, in one place: the request schemas (`app.specs`, `app.jobs.schemas`,
`app.chat.schemas`, `app.inference_contract`) declare them as pydantic constraints, so the OpenAPI schema
states them too, and the README's "Limits" table lists them.

Every number is finite and within a range a worker can run; every string and list has a length cap; every
string is valid Unicode (the string types below): a lone surrogate such as `"\\ud800"`, which JSON's escapes
can spell but UTF-8 cannot encode, would otherwise fail later, in the database, the tokenizer or a response.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

# Training (training_config, hyperparameters)
MAX_STEPS = 1_000_000  # max_steps, and logging/eval/save_steps
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 1024  # per-device batch sizes
MAX_GRADIENT_ACCUMULATION_STEPS = 1024
MAX_SEQ_LENGTH = 131_072  # the longest context of a Phi-3 model
MIN_SEQ_LENGTH = 16
MAX_LEARNING_RATE = 1.0
MAX_LEARNING_RATE_MULTIPLIER = 100.0
MAX_WEIGHT_DECAY = 1.0
MAX_GRAD_NORM = 1000.0
MAX_EARLY_STOPPING_THRESHOLD = 100.0  # an eval loss improvement; a loss that falls this much has diverged
MAX_SAVE_TOTAL_LIMIT = 100  # also the default once checkpoints are stored: never an unbounded number kept
MAX_SEED = 2**31 - 1  # OpenAI's fine-tuning seed: 0 to 2,147,483,647 (the jobs table's integer)
MAX_OUTPUT_DIR_CHARS = 4096  # accepted for the recipe's sake, never stored

# LoRA (peft_config)
MAX_LORA_RANK = 1024
MAX_LORA_ALPHA = 4096.0
MAX_TARGET_MODULES = 64  # target_modules and modules_to_save entries
MAX_MODULE_NAME_CHARS = 200

# Job requests
MAX_MODEL_ID_CHARS = 200  # the jobs table's model column
MAX_FILE_ID_CHARS = 64
MAX_METADATA_PAIRS = 16  # metadata: OpenAI's limits
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# Chat completions
MAX_CHAT_MODEL_CHARS = 300  # a checkpoint's fine_tuned_model_checkpoint name
MAX_MESSAGES = 2048
MAX_CONTENT_CHARS = 2 * 1024 * 1024  # a message's text, all its parts together
MAX_CONTENT_PARTS = 256
MAX_NAME_CHARS = 256  # a message's name, the request's user
MAX_COMPLETION_TOKENS = 131_072
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
MIN_CHAT_SEED, MAX_CHAT_SEED = -(2**63), 2**63 - 1  # OpenAI's chat seed: a signed 64-bit integer

# Webhooks (app.webhooks)
MAX_WEBHOOKS_PER_TENANT = 16  # endpoints a tenant may register
MAX_WEBHOOK_URL_CHARS = 2048  # the webhook_endpoints table's url column

# What workers report (app.internal.contracts)
MAX_REPORTED_STEP = 2**31 - 1  # a step: MAX_STEPS bounds max_steps, not epochs × batches; the tables' integer
MAX_TRAINED_TOKENS = 2**31 - 1  # the jobs table's trained_tokens is an integer
MAX_EVENT_MESSAGE_CHARS = 4000  # an event's message, a failure's message, peft_unavailable_reason
MAX_ERROR_CODE_CHARS = 64  # a failure's code, as the job's error lists it
MAX_REASON_CHARS = 400  # why a requeued attempt stopped
MAX_DATA_PAIRS = 32  # an event's data, a checkpoint's metrics: flat name → scalar pairs
MAX_DATA_KEY_CHARS = 64
MAX_DATA_VALUE_CHARS = 256  # a string value among them (a device name); numbers, booleans and null the others
MIN_DATA_INT, MAX_DATA_INT = -(2**63), 2**63 - 1  # an integer value among them: a signed 64-bit integer


def valid_unicode(value: Any) -> Any:
    """Refuse a string with a lone surrogate, saying where: JSON escapes can spell one, but no UTF-8 text
    holds it. Anything else is left to the type's own validation."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            surrogate = ord(value[error.start])
            raise ValueError(
                f"not valid Unicode: a lone surrogate (\\u{surrogate:04x}) at character {error.start}"
            ) from None
    return value


def _bounded(max_chars: int, min_chars: int = 0) -> tuple[Any, ...]:
    # A validator before the constraints, not after: constraints after a validator are checked, and worded,
    # as a list's ("at most 3 items").
    return Field(min_length=min_chars, max_length=max_chars), BeforeValidator(valid_unicode)


def declared(**bounds: Any) -> Any:
    """Bounds stated in the OpenAPI schema only, for a member of a union that a validator of the field checks
    as a whole: pydantic would report a member's own constraint under the member's tag ("content.str")."""
    return Field(json_schema_extra=bounds)


# Strings of requests, each valid Unicode and bounded.
ModelId = Annotated[str, *_bounded(MAX_MODEL_ID_CHARS, 1)]
FileId = Annotated[str, *_bounded(MAX_FILE_ID_CHARS, 1)]
MetadataKey = Annotated[str, *_bounded(MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, *_bounded(MAX_METADATA_VALUE_CHARS)]
ModuleName = Annotated[str, *_bounded(MAX_MODULE_NAME_CHARS, 1)]
OutputDir = Annotated[str, *_bounded(MAX_OUTPUT_DIR_CHARS)]
ChatModelId = Annotated[str, *_bounded(MAX_CHAT_MODEL_CHARS, 1)]
Content = Annotated[str, *_bounded(MAX_CONTENT_CHARS)]
Name = Annotated[str, *_bounded(MAX_NAME_CHARS)]
StopSequence = Annotated[str, *_bounded(MAX_STOP_CHARS, 1)]
EventMessage = Annotated[str, *_bounded(MAX_EVENT_MESSAGE_CHARS)]
ErrorCode = Annotated[str, *_bounded(MAX_ERROR_CODE_CHARS)]
Reason = Annotated[str, *_bounded(MAX_REASON_CHARS)]
DataKey = Annotated[str, *_bounded(MAX_DATA_KEY_CHARS, 1)]
WebhookUrl = Annotated[str, *_bounded(MAX_WEBHOOK_URL_CHARS, 1)]
