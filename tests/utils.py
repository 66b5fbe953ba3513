"""Factories shared by the API tests."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

CHAT_LINES = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": str(2 * i)},
        ]
    }
    for i in range(8)
]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def upload_file(
    client: TestClient, auth: dict[str, str], records: list[dict], name: str = "train.jsonl"
) -> str:
    """Upload a JSONL dataset and return its file id."""
    response = client.post(
        "/v1/files",
        files={"file": (name, jsonl(records), "application/jsonl")},
        data={"purpose": "fine-tune"},
        headers=auth,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]
