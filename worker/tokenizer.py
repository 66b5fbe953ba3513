"""How every process loads a base model's tokenizer (training worker, inference server, benchmarks)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model directory (or hub id)."""
    return AutoTokenizer.from_pretrained(name_or_path)
