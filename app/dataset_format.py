"""The dataset record formats: what one line of a JSONL training file may hold, defined once.

The API validates uploads with these models (`app.files.validation` numbers the lines, keeps one format per
file and gathers statistics) and the worker reads the training file with them (`worker.data`), so a role or
a field added here is accepted by both at once. It lives on the API side because the API must install
without the worker.

One JSON object per line (UTF-8; a byte order mark is accepted at the start of the file, as Windows editors
write one), blank lines ignored, in one of four formats, recognised by their keys:

    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": "...", ...}, ...]}
    prompt_completion   {"prompt": "...", "completion": "..."}
    text                {"text": "..."}
    preference          {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
                         "non_preferred_output": [{"role": "assistant", ...}]}

The first three train supervised jobs, the last preference (DPO) jobs (OpenAI's and Together's format).

Decisions beyond the API contract:
- Unknown keys are errors, at the top level and in messages, because the trainer would silently drop them
  (a typo such as "mesages" or "contents" would otherwise train on nothing).
- A message may carry `name` (a string) so that OpenAI-format datasets load unchanged; Phi-3's chat template
  does not render it.
- `weight` (0 or 1) is allowed only on assistant messages; a chat example needs at least one assistant
  message with weight 1 (the default), otherwise it has nothing to train on.
- `completion` and `text` must not be empty, for the same reason; other strings may be empty.
- A preference record's outputs are one assistant message each, without `weight` (the whole answer is
  compared) and with non-empty content; its input is a chat of at least one message and no weights (the
  input is never trained on).
- The text must be Unicode the tokenizer can read: invalid UTF-8, and lone surrogates spelled as JSON escapes
  (`"\\ud800"`), are refused (`invalid_utf8`, `invalid_unicode`), and so are numbers no float holds (`1e400`,
  `NaN`, an integer of thousands of digits: `invalid_number`), rather than failing the job later.

A record that breaks a rule raises `RecordError`, with a code and a message that names the place, e.g.
`invalid_role` and `messages[1].role must be one of system, user, assistant; got 'robot'`: each field states
its own with `Invalid` metadata, and the rules across fields raise theirs as pydantic custom errors whose
type is the code.

`line_checker` is the same rules as plain Python over a line parsed by orjson, for the upload validator's
speed: it only says "a valid record, with these statistics" or "ask the models" (which then give the
problem), so it never decides a refusal. It must accept exactly what the models accept;
`tests/api/test_format_fast_path.py` checks that it does, over many generated records and lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

CHAT, PROMPT_COMPLETION, TEXT, PREFERENCE = "chat", "prompt_completion", "text", "preference"
Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class Invalid:
    """Metadata of a field (or of a list's items): the problem reported when it is missing or fails its type
    or constraints. `message` follows the place (`"prompt"`, `messages[0].role`); `{found}` in it becomes
    what was there (`it is missing`, `got 'abc'`, `got a number`), `{type}` the JSON type of the value and
    `{value!r}` the value. `empty`, when given, is the message for an empty string or list instead."""

    code: str
    message: str
    empty: str | None = None


class RecordError(ValueError):
    """Why a line is not a record: a problem `code` and a `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Record(BaseModel):
    # Strict: no coercion, a JSON value is taken as it is; frozen: a record read is a record kept.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Message(_Record):
    """One turn of a chat record."""

    role: Annotated[Role, Invalid("invalid_role", f"must be one of {', '.join(ROLES)}; {{found}}")]
    content: Annotated[str, Invalid("invalid_content", "must be a string; {found}")]
    # Absent or a string; null is refused (pydantic does not validate the default).
    name: Annotated[str, Invalid("invalid_name", "must be a string")] = None  # type: ignore[assignment]
    weight: Annotated[Literal[0, 1], Invalid("invalid_weight", "must be 0 or 1, got {value!r}")] = 1

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_on_assistant_turns_only(cls, weight: Any, info: ValidationInfo) -> Any:
        if info.data.get("role", "assistant") != "assistant":  # absent when the role itself is invalid
            raise PydanticCustomError("invalid_weight", "is only allowed on assistant messages")
        if isinstance(weight, bool):  # a Literal[0, 1] would take true for 1
            raise ValueError("a boolean is not a weight")
        return weight


class ChatRecord(_Record):
    """`{"messages": [...]}`: a conversation, trained on its assistant turns of weight 1."""

    format: ClassVar[str] = CHAT
    messages: Annotated[
        list[Annotated[Message, Invalid("invalid_message", "must be an object, got {type}")]],
        Field(min_length=1),
        Invalid("invalid_messages", "must be a non-empty list of message objects"),
    ]

    @model_validator(mode="after")
    def _trains_on_something(self) -> ChatRecord:
        if not self.trained_turns:
            raise PydanticCustomError(
                "missing_assistant_turn",
                "The conversation needs at least one assistant message (with weight 1)",
            )
        return self

    @property
    def trained_turns(self) -> int:
        """The assistant messages of weight 1."""
        return sum(message.role == "assistant" and message.weight == 1 for message in self.messages)

    @property
    def characters(self) -> int:
        return sum(len(message.content) for message in self.messages)


class PromptCompletionRecord(_Record):
    """`{"prompt", "completion"}`: a user turn answered by an assistant turn."""

    format: ClassVar[str] = PROMPT_COMPLETION
    prompt: Annotated[str, Invalid("invalid_prompt", "must be a string; {found}")]
    completion: Annotated[
        str,
        Field(min_length=1),
        Invalid("invalid_completion", "must be a string; {found}", "must not be empty"),
    ]

    def as_chat(self) -> ChatRecord:
        """The same example as a chat record."""
        return ChatRecord(
            messages=[
                Message(role="user", content=self.prompt),
                Message(role="assistant", content=self.completion),
            ]
        )

    @property
    def characters(self) -> int:
        return len(self.prompt) + len(self.completion)


class TextRecord(_Record):
    """`{"text"}`: plain text, trained on entirely."""

    format: ClassVar[str] = TEXT
    text: Annotated[str, Field(min_length=1), Invalid("invalid_text", "must be a non-empty string")]

    @property
    def characters(self) -> int:
        return len(self.text)


class PreferenceInput(_Record):
    """A preference record's `input`: the conversation both outputs answer."""

    messages: Annotated[
        list[Annotated[Message, Invalid("invalid_message", "must be an object, got {type}")]],
        Field(min_length=1),
        Invalid("invalid_messages", "must be a non-empty list of message objects"),
    ]

    @model_validator(mode="after")
    def _no_weights(self) -> PreferenceInput:
        if any("weight" in message.model_fields_set for message in self.messages):
            raise PydanticCustomError(
                "invalid_weight", "has a message with a weight: a preference input is never trained on"
            )
        return self


def _one_answer(value: Any) -> Any:
    """An output is one assistant message: its role, weight and content are checked before the message's
    own rules, so that the problem named is the one that matters here."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        answer = value[0]
        if answer.get("role") != "assistant":
            raise PydanticCustomError("invalid_output", "must be one assistant message")
        if "weight" in answer:
            raise PydanticCustomError(
                "invalid_output", "must not carry a weight: the whole answer is compared"
            )
        if answer.get("content") == "":
            raise PydanticCustomError("invalid_output", "must not be an empty answer")
    return value


Output = Annotated[
    list[Annotated[Message, Invalid("invalid_output", "must be a message object, got {type}")]],
    Field(min_length=1, max_length=1),
    BeforeValidator(_one_answer),
    Invalid("invalid_output", "must be a list of one assistant message; {found}"),
]


class PreferenceRecord(_Record):
    """`{"input", "preferred_output", "non_preferred_output"}`: two answers to one conversation, the first
    preferred; a DPO job learns to prefer it."""

    format: ClassVar[str] = PREFERENCE
    # Recognised by its outputs: "input" alone is a common key of other datasets' formats (Alpaca's).
    detected_by: ClassVar[frozenset[str]] = frozenset({"preferred_output", "non_preferred_output"})
    input: Annotated[
        PreferenceInput, Invalid("invalid_input", 'must be an object {{"messages": [...]}}; {found}')
    ]
    preferred_output: Output
    non_preferred_output: Output

    @property
    def preferred(self) -> Message:
        return self.preferred_output[0]

    @property
    def non_preferred(self) -> Message:
        return self.non_preferred_output[0]

    @property
    def characters(self) -> int:
        return (
            sum(len(message.content) for message in self.input.messages)
            + len(self.preferred.content)
            + len(self.non_preferred.content)
        )


Record = ChatRecord | PromptCompletionRecord | TextRecord | PreferenceRecord
# In the order a record's format is detected: the first whose required keys (or `detected_by` keys) the
# record has any of.
FORMATS: dict[str, type[Record]] = {
    CHAT: ChatRecord,
    PROMPT_COMPLETION: PromptCompletionRecord,
    TEXT: TextRecord,
    PREFERENCE: PreferenceRecord,
}
SUPERVISED_FORMATS = frozenset({CHAT, PROMPT_COMPLETION, TEXT})
"""The formats a supervised job trains on; a DPO job trains on PREFERENCE files only."""
UNKNOWN_FORMAT = (
    'Expected "messages" (chat), "prompt" and "completion", "text", or "input", "preferred_output" and '
    '"non_preferred_output" (preference)'
)


def load_line(line: bytes, *, first: bool = False) -> dict[str, Any] | None:
    """The JSON object on one line of a file (`first`: the file's first line, which may begin with a byte
    order mark), or None for a blank line; RecordError when it is not one."""
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise RecordError("invalid_utf8", f"Not valid UTF-8 (byte {error.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecordError:
        raise
    except json.JSONDecodeError as error:
        raise RecordError("invalid_json", f"Invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise RecordError("invalid_json", "Invalid JSON: nested too deeply") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise RecordError("invalid_number", "A number on this line has too many digits") from None
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"Expected a JSON object, got {json_type(obj)}")
    if _SURROGATE_ESCAPE.search(text) and (loc := _lone_surrogate(obj)) is not None:
        raise RecordError(
            "invalid_unicode",
            f"{_place(loc)[:80] or 'The record'} holds a lone surrogate (a \\ud800-\\udfff escape not half "
            "of a pair): not Unicode text",
        )
    return obj


# Where a lone surrogate can come from: an escape of one; most lines have none and are not searched further.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise RecordError("invalid_number", f"The number {literal[:40]} is too large for a float")
    return value


def _no_constant(name: str) -> float:
    raise RecordError("invalid_number", f"{name} is not a JSON number")


def _lone_surrogate(obj: dict[str, Any]) -> tuple[int | str, ...] | None:
    """Where in a parsed line a string holds a lone surrogate (a key: the object holding it), or None. Walked
    without recursion: the line may nest as deep as the parser allows."""
    pending: list[tuple[tuple[int | str, ...], Any]] = [((), obj)]
    while pending:
        loc, value = pending.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return loc
        elif isinstance(value, dict):
            if not all(_is_unicode(key) for key in value):
                return loc
            pending.extend(((*loc, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            pending.extend(((*loc, index), item) for index, item in reversed(list(enumerate(value))))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def detect_format(obj: Mapping[str, Any]) -> str:
    """The format a JSON object is written in, judged by its keys; RecordError when it matches none."""
    for name, model in FORMATS.items():
        if _format_keys(model) & obj.keys():
            return name
    raise RecordError("unknown_format", f"{UNKNOWN_FORMAT}; found keys {sorted(obj)}")


def validate_record(obj: Mapping[str, Any], record_format: str) -> Record:
    """`obj` as a record of `record_format`; RecordError with the first problem when it is not one (unknown
    keys first, then the fields in order, each message in turn, then the rules across fields)."""
    model = FORMATS[record_format]
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = min(exc.errors(), key=_problem_order)
        raise _record_error(first, model) from None


def parse_record(obj: Mapping[str, Any]) -> Record:
    """A JSON object as a record of the format it is written in; RecordError when it is none."""
    return validate_record(obj, detect_format(obj))


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), "a number")


# A valid record's statistics: (messages, trained turns, characters); the first two are 0 but for chat.
RecordStats = tuple[int, int, int]


def line_checker(record_format: str) -> Callable[[bytes], RecordStats | None]:
    """A function of one line of a file (not its first, which may begin with a byte order mark) that returns
    the statistics of the record on it when it is a valid record of `record_format`, and None otherwise:
    a blank line, not JSON, another format or a problem, for `load_line` and the models to tell which.

    The same rules as the models, as plain Python checks on the object orjson parses (JSON that orjson
    refuses but `json` takes, such as NaN, a lone surrogate or a huge integer, is left to `load_line`)."""
    check = _FAST_CHECKS[record_format]
    loads, decode_error = orjson.loads, orjson.JSONDecodeError

    def checked(line: bytes) -> RecordStats | None:
        try:
            obj = loads(line)
        except decode_error:
            return None
        return check(obj) if type(obj) is dict else None

    return checked


_ROLE_SET = frozenset(ROLES)
_MESSAGE_KEYS = frozenset(Message.model_fields)
_WEIGHT_TYPES = (int, float)  # a Literal[0, 1] takes 0.0 and 1.0 too; bool is neither


def _chat_stats(obj: dict[str, Any]) -> RecordStats | None:
    messages = obj.get("messages")
    if len(obj) != 1 or type(messages) is not list or not messages:
        return None
    trained = characters = 0
    for message in messages:
        if type(message) is not dict:
            return None
        role, content = message.get("role"), message.get("content")
        if type(content) is not str or type(role) is not str:
            return None
        if len(message) == 2:  # `role` and `content` only, the most common message
            if role == "assistant":
                trained += 1
            elif role not in _ROLE_SET:
                return None
        else:  # the others must be `name` (a string) and `weight` (on assistant messages)
            if role not in _ROLE_SET or not _MESSAGE_KEYS.issuperset(message):
                return None
            if "name" in message and type(message["name"]) is not str:
                return None
            if "weight" not in message:
                trained += role == "assistant"
            else:
                weight = message["weight"]
                if role != "assistant" or type(weight) not in _WEIGHT_TYPES or weight not in (0, 1):
                    return None
                trained += weight == 1
        characters += len(content)
    return (len(messages), trained, characters) if trained else None


def _prompt_completion_stats(obj: dict[str, Any]) -> RecordStats | None:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if len(obj) != 2 or type(prompt) is not str or type(completion) is not str or not completion:
        return None
    return 0, 0, len(prompt) + len(completion)


def _text_stats(obj: dict[str, Any]) -> RecordStats | None:
    text = obj.get("text")
    if len(obj) != 1 or type(text) is not str or not text:
        return None
    return 0, 0, len(text)


def _preference_stats(obj: dict[str, Any]) -> RecordStats | None:
    source = obj.get("input")
    if len(obj) != 3 or type(source) is not dict or len(source) != 1:
        return None
    messages = source.get("messages")
    if type(messages) is not list or not messages:
        return None
    characters = 0
    for message in messages:
        if type(message) is not dict or not _plain_message(message) or message["role"] not in _ROLE_SET:
            return None
        characters += len(message["content"])
    for key in ("preferred_output", "non_preferred_output"):
        output = obj.get(key)
        if type(output) is not list or len(output) != 1 or type(output[0]) is not dict:
            return None
        answer = output[0]
        if not _plain_message(answer) or answer["role"] != "assistant" or not answer["content"]:
            return None
        characters += len(answer["content"])
    return 0, 0, characters


def _plain_message(message: dict[str, Any]) -> bool:
    """`role` and `content` strings, and perhaps a `name` string, nothing else (no weight)."""
    if type(message.get("role")) is not str or type(message.get("content")) is not str:
        return False
    return len(message) == 2 or (len(message) == 3 and type(message.get("name")) is str)


_FAST_CHECKS: dict[str, Callable[[dict[str, Any]], RecordStats | None]] = {
    CHAT: _chat_stats,
    PROMPT_COMPLETION: _prompt_completion_stats,
    TEXT: _text_stats,
    PREFERENCE: _preference_stats,
}


def _format_keys(model: type[BaseModel]) -> set[str]:
    """The keys a record of `model`'s format is recognised by: its required ones, unless it names others."""
    detected_by = getattr(model, "detected_by", None)
    if detected_by is not None:
        return set(detected_by)
    return {name for name, field in model.model_fields.items() if field.is_required()}


def _problem_order(error: ErrorDetails) -> tuple[tuple[int, ...], bool, str]:
    """Earlier list items first; within one object, its unknown keys (by name) before its fields (pydantic
    reports the fields first, in their order)."""
    loc, unknown_key = error["loc"], error["type"] == "extra_forbidden"
    return (
        tuple(part for part in loc if isinstance(part, int)),
        not unknown_key,
        str(loc[-1]) if unknown_key else "",
    )


_PYDANTIC_ERRORS = frozenset(get_args(ErrorType))


def _record_error(error: ErrorDetails, model: type[BaseModel]) -> RecordError:
    """A pydantic error as the problem it is: unknown key, a rule's own error, or the Invalid of its place."""
    loc, error_type = error["loc"], error["type"]
    if error_type == "extra_forbidden":
        owner, _ = _described(model, loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        return RecordError(
            "unknown_key", f"Unknown key {loc[-1]!r} in {_place(loc[:-1]) or 'record'}; allowed: {allowed}"
        )
    place = _place(loc)
    if error_type not in _PYDANTIC_ERRORS:  # a PydanticCustomError of a rule of this module
        return RecordError(error_type, f"{place} {error['msg']}" if place else error["msg"])
    _, invalid = _described(model, loc)
    if invalid is None:  # a field that states no Invalid of its own
        return RecordError(
            f"invalid_{_field_name(loc)}", f"{place or 'The record'} is invalid: {error['msg']}"
        )
    message = invalid.message
    if invalid.empty and error_type in ("too_short", "string_too_short"):
        message = invalid.empty
    value = error["input"]
    if error_type == "missing":
        found = "it is missing"
    elif isinstance(value, str):
        found = f"got {value[:40]!r}"
    else:
        found = f"got {json_type(value)}"
    return RecordError(
        invalid.code, f"{place} " + message.format(found=found, type=json_type(value), value=_Shown(value))
    )


class _Shown:
    """A value as `{value!r}` shows it in a message, cut short (an integer may have thousands of digits)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        text = repr(self.value)
        return text if len(text) <= 40 else f"{text[:40]}…"


def _described(
    model: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[type[BaseModel] | None, Invalid | None]:
    """The model at `loc` (None when it is not a model) and the innermost Invalid stated on the way there."""
    current: Any = model
    invalid = None
    for part in loc:
        if isinstance(part, str) and isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None, invalid
            current, metadata = field.annotation, field.metadata
        elif isinstance(part, int) and get_origin(current) is list:
            item = get_args(current)[0]
            current, metadata = (
                (get_args(item)[0], item.__metadata__) if get_origin(item) is Annotated else (item, [])
            )
        else:
            return None, invalid
        invalid = next((m for m in metadata if isinstance(m, Invalid)), invalid)
    return (current if isinstance(current, type) and issubclass(current, BaseModel) else None), invalid


def _place(loc: tuple[int | str, ...]) -> str:
    """Where in a record `loc` is: `"prompt"` for a top-level key, else a path such as `messages[0].role`."""
    if len(loc) == 1 and isinstance(loc[0], str):
        return f'"{loc[0]}"'
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _field_name(loc: tuple[int | str, ...]) -> str:
    return next((part for part in reversed(loc) if isinstance(part, str)), "record")
