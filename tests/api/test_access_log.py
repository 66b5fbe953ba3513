"""PHITUNE_ACCESS_LOG: the API's access lines, logged by app.request_id with each request's id: by default
for every request but reads (pollers would fill the log), for all of them, or none."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.log_setup import request_id
from app.main import create_app
from app.request_id import AccessLog


class Lines(logging.Handler):
    """The access lines logged, each with the request id in force when it was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), request_id.get()))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler, logger = Lines(), logging.getLogger("app.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not assignment: it clears the loggers' cached levels
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def requests(settings: Settings, access_log: AccessLog, auth: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"access_log": access_log}))) as client:
        client.get("/healthz", headers={"X-Request-ID": "read-1"})
        client.get("/v1/models?limit=2", headers={**auth, "X-Request-ID": "read-2"})
        client.post("/v1/fine_tuning/jobs", json={}, headers={**auth, "X-Request-ID": "write-1"})


def test_by_default_every_request_but_a_read_has_an_access_line(settings, auth, lines: Lines) -> None:
    requests(settings, "writes", auth)
    assert lines.lines == [('testclient:50000 - "POST /v1/fine_tuning/jobs HTTP/1.1" 400', "write-1")]


def test_all_logs_reads_too_with_their_query(settings, auth, lines: Lines) -> None:
    requests(settings, "all", auth)
    assert lines.lines == [
        ('testclient:50000 - "GET /healthz HTTP/1.1" 200', "read-1"),
        ('testclient:50000 - "GET /v1/models?limit=2 HTTP/1.1" 200', "read-2"),
        ('testclient:50000 - "POST /v1/fine_tuning/jobs HTTP/1.1" 400', "write-1"),
    ]


def test_off_logs_none(settings, auth, lines: Lines) -> None:
    requests(settings, "off", auth)
    assert lines.lines == []
