"""Fixtures of the API tests beyond tests/conftest.py."""

from __future__ import annotations

import pytest

from tests.utils import CHAT_LINES, upload_file


@pytest.fixture
def job_id(client, auth) -> str:
    """A queued job of the `auth` tenant."""
    file_id = upload_file(client, auth, CHAT_LINES)
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}, headers=auth
    )
    return response.json()["id"]
