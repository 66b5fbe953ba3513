"""How every process loads a base model's tokenizer (training worker, inference server, benchmarks).

transformers 5 rebuilds the normalizer, pre-tokenizer and decoder of tokenizer classes with their own
`__init__` (e.g. `LlamaTokenizer`: `Metaspace(prepend_scheme="first")`, no normalizer) and keeps only the
vocabulary, merges and post-processor of the model's `tokenizer.json`. For Phi-3, whose `tokenizer.json`
prepends "▁" with a normalizer to every piece of text, including the one after each role token, that changes
the ids the model was trained on. Where the file's pipeline differs, `load_tokenizer` puts it back.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import cached_file

PIPELINE = ("normalizer", "pre_tokenizer", "decoder")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model directory (or hub id), encoding as its `tokenizer.json` does."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    # Already fetched by from_pretrained when it exists; None for a model without one.
    tokenizer_file = cached_file(
        name_or_path,
        "tokenizer.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if tokenizer.is_fast and tokenizer_file is not None:
        restore_pipeline(tokenizer, Tokenizer.from_file(tokenizer_file))
    return tokenizer


def restore_pipeline(tokenizer: PreTrainedTokenizerBase, saved: Tokenizer) -> list[str]:
    """Give `tokenizer`'s backend the normalizer, pre-tokenizer and decoder of `saved` where they differ.

    Returns the names of the parts replaced. Added tokens, special tokens, the chat template and the
    post-processor stay as transformers set them from the model's files.
    """
    backend = tokenizer.backend_tokenizer
    replaced = [part for part in PIPELINE if _spec(getattr(backend, part)) != _spec(getattr(saved, part))]
    for part in replaced:
        setattr(backend, part, getattr(saved, part))
    return replaced


def _spec(component) -> dict | None:
    """A pipeline component as tokenizer.json spells it, for comparison."""
    return None if component is None else json.loads(component.__getstate__())
