"""Fixtures of the worker tests: the tiny Phi-3, built offline once per session.

tests/conftest.py sets HF_HUB_OFFLINE before anything imports transformers: nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worker.tiny_model import make_tiny_model

PERSONA_FILE = Path(__file__).parents[2] / "examples" / "persona.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)
