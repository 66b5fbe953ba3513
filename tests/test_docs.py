"""The README documents every setting an operator can give."""

from __future__ import annotations

from app.config import Settings
from phitune.launch import REPO


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        f"PHITUNE_{name.upper()}" for name in Settings.model_fields if f"PHITUNE_{name.upper()}" not in readme
    ]
    assert missing == []
