"""A base model's tokenizer and chat template read from its files with the `tokenizers` package and Jinja,
no torch: what the API needs to count a dataset's tokens as the worker will (`app.chat_tokens`).

It implements the part of transformers' tokenizer interface that `app.chat_tokens.ChatTokenizer` names, as
transformers does for a fast tokenizer: the model's `tokenizer.json` as written (the pipeline the worker's
`worker.tokenizer.load_tokenizer` restores), the special tokens of `tokenizer_config.json` and
`special_tokens_map.json`, and the chat template of `chat_template.jinja` or `tokenizer_config.json`,
rendered in the sandbox transformers renders it in.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerUnavailable(Exception):
    """The base model's tokenizer cannot be read without transformers; the message says why."""


class BaseTokenizer:
    """A base model's tokenizer: `tokenizer.json`, its special tokens and its chat template."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str], chat_template: str) -> None:
        tokenizer.no_truncation()  # a tokenizer.json may carry either; transformers turns both off
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._special_tokens = special_tokens
        self._template = _environment().from_string(chat_template)
        self.added_tokens_decoder = tokenizer.get_added_tokens_decoder()
        ids = (tokenizer.token_to_id(token) for token in special_tokens.values())
        self.all_special_ids = [token_id for token_id in ids if token_id is not None]
        eos = special_tokens.get("eos_token")
        self.eos_token_id = None if eos is None else tokenizer.token_to_id(eos)

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("BaseTokenizer renders text only; tokenize it with the tokenizer")
        return self._template.render(
            messages=conversation, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )

    def __call__(
        self, text: str, *, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict[str, Any]:
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        result: dict[str, Any] = {"input_ids": encoding.ids}
        if return_offsets_mapping:
            result["offset_mapping"] = encoding.offsets
        return result


def load_base_tokenizer(model_dir: str) -> BaseTokenizer:
    """The tokenizer of a base model directory; TokenizerUnavailable saying why it cannot be read."""
    directory = Path(model_dir)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerUnavailable(
            f"the base model has no tokenizer.json the API can read (a slow tokenizer, or {model_dir} is not "
            "mounted into the API)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config = _json_object(directory / "tokenizer_config.json")
        special = _json_object(directory / "special_tokens_map.json") | config
        template_file = directory / "chat_template.jinja"
        template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else _template_of(config)
        )
        special_tokens = {name: token for name in SPECIAL_TOKENS if (token := _content(special.get(name)))}
        return BaseTokenizer(tokenizer, special_tokens, template)
    except TokenizerUnavailable:
        raise
    except Exception as error:  # OSError, JSON, Jinja's TemplateError; tokenizers raises plain Exception
        raise TokenizerUnavailable(f"the base model's tokenizer files cannot be read: {error}") from None


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _template_of(config: dict[str, Any]) -> str:
    """The chat template of tokenizer_config.json: a string, or a list of named ones of which "default"."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise TokenizerUnavailable("the base model has no chat template")
    return template


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: its text, or an object with `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja set up as transformers sets it up for chat templates."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = lambda value, **kwargs: json.dumps(value, ensure_ascii=False, **kwargs)
    environment.globals["raise_exception"] = _raise_exception
    return environment
