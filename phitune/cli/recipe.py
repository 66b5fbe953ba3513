"""The recipe of `phitune jobs create`: training_config and peft_config from a JSON or YAML file (`--config`),
with inline JSON (`--training-config`, `--peft-config`) on top. The server validates both dictionaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phitune.cli.output import fail

SECTIONS = ("training_config", "peft_config")


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The sections of a recipe file: JSON when it is named *.json, else YAML (of which JSON is a subset)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as problem:
        fail(f"cannot read {path}: {problem.strerror or problem}")
    if path.suffix.lower() == ".json":
        try:
            recipe = json.loads(text)
        except ValueError as problem:
            fail(f"{path} is not valid JSON: {problem}")
    else:
        recipe = _yaml(path, text)
    if not isinstance(recipe, dict):
        fail(f"{path} must hold a mapping with {' and/or '.join(SECTIONS)}")
    if unknown := sorted(set(recipe) - set(SECTIONS)):
        fail(f"{path}: unknown key {', '.join(map(repr, unknown))}; a recipe holds {' and '.join(SECTIONS)}")
    for section, value in recipe.items():
        if not isinstance(value, dict):
            fail(f"{path}: {section} must be a mapping")
    return recipe


def _yaml(path: Path, text: str) -> Any:
    import yaml  # here, so that commands reading no recipe do not pay for the import

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as problem:
        fail(f"{path} is not valid YAML: {problem}")


def inline(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as problem:
        fail(f"{option} is not valid JSON: {problem}")
    if not isinstance(value, dict):
        fail(f"{option} must be a JSON object, e.g. '{{\"learning_rate\": 2e-4}}'")
    return value


def recipe(
    config: Path | None, training_config: str | None, peft_config: str | None
) -> dict[str, dict[str, Any]]:
    """The job's training_config and peft_config (those given): the file's, updated by the inline ones."""
    sections = read_config_file(config) if config else {}
    for section, text, option in [
        ("training_config", training_config, "--training-config"),
        ("peft_config", peft_config, "--peft-config"),
    ]:
        if text is not None:
            sections[section] = {**sections.get(section, {}), **inline(option, text)}
    return sections
