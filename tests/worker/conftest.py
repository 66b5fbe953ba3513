"""Fixtures and helpers of the worker tests: the tiny Phi-3, built offline once per session.

tests/conftest.py sets HF_HUB_OFFLINE before anything imports transformers: nothing is ever downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from worker.data import chat_turns, read_jsonl
from worker.recipe import RecipeInputs
from worker.tiny_model import TOKENIZER_CORPUS

PERSONA_FILE = Path(__file__).parents[2] / "examples" / "persona.jsonl"


@dataclass
class Recorder:
    """A ProgressReporter that keeps every event, checkpoint and resume state, cancels after `stop_after`
    events and hands the attempt back ("pause") at step `hand_back_at`.

    A checkpoint's files are read during the call, and a resume state is copied: the recipe may delete the
    directory afterwards.
    """

    stop_after: int | None = None
    hand_back_at: int | None = None
    events: list[dict] = field(default_factory=list)
    messages: list[tuple[str, str, dict | None]] = field(default_factory=list)  # (level, text, data)
    checkpoints: list[dict] = field(default_factory=list)
    states: dict[int, Path] = field(default_factory=dict)  # step → a copy of its resume state
    _steps: int = 0

    def on_metrics(self, metrics: dict) -> None:
        self.events.append(metrics)

    def message(self, text: str, *, level: str = "info", data: dict | None = None) -> None:
        self.messages.append((level, text, data))

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict) -> None:
        files = {
            str(path.relative_to(adapter_dir)): path.read_bytes()
            for path in sorted(adapter_dir.rglob("*"))
            if path.is_file()
        }
        self.checkpoints.append({"step": step, "metrics": metrics, "files": files})

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.events) >= self.stop_after

    def hand_back(self) -> str | None:
        self._steps += 1  # the recipe asks once at the end of every step but the last
        return "pause" if self.hand_back_at is not None and self._steps >= self.hand_back_at else None

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        copy = Path(tempfile.mkdtemp(prefix=f"state-{step}-"))
        shutil.copytree(state_dir, copy, dirs_exist_ok=True)
        self.states[step] = copy


@pytest.fixture(scope="session")
def persona_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The first persona conversation as a batch of one, to compare models' logits on."""
    messages = chat_turns(read_jsonl(PERSONA_FILE)[0].messages)
    return tokenizer.apply_chat_template(messages, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="session")
def plain_replies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain support replies to the persona's kind of questions: a validation set whose loss first falls, as
    the model learns the chat format, then rises as training on the pirate persona takes over."""
    path = tmp_path_factory.mktemp("validation") / "plain.jsonl"
    replies = TOKENIZER_CORPUS.splitlines()[:12]  # the plain support sentences, before the pirate talk
    conversations = [
        {
            "messages": [
                {"role": "user", "content": "Can you help me?"},
                {"role": "assistant", "content": reply},
            ]
        }
        for reply in replies
    ]
    path.write_text("".join(json.dumps(conversation) + "\n" for conversation in conversations))
    return path


def fresh_base(model_dir: Path) -> torch.nn.Module:
    """The untrained tiny model, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def persona_inputs(base_model: Path, **fields) -> RecipeInputs:
    """RecipeInputs that train on the persona data; `fields` are the other RecipeInputs fields."""
    return RecipeInputs(
        base_model=str(base_model), training_file=PERSONA_FILE, **{"validation_file": None, **fields}
    )
