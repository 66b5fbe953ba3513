"""Logging for every phitune process (the API, the training worker, the inference server), without torch.

`configure(role, settings)` sends every record, the libraries' included, to one handler on stderr:
PHITUNE_LOG_FORMAT=json writes one JSON object a line (ts, level, logger, message, role, and request_id,
job_id, attempt where known), text a line for a terminal. What a line is about comes from context variables,
set where the work starts (a request, a training task) and inherited by everything it calls.

What is logged is what the code writes in its messages: API keys and tokens are never put in one, nor a
dataset's content (tests/e2e/test_operations.py runs a job and searches every process's output for both).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
# The training message's header with the id of the request that queued the job (app.broker).
TASK_REQUEST_ID = "phitune_request_id"
# A request id a client or a proxy sends is kept when it is this sane, else replaced by a fresh one.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
attempt: ContextVar[int | None] = ContextVar("attempt", default=None)
CONTEXT: dict[str, ContextVar[Any]] = {"request_id": request_id, "job_id": job_id, "attempt": attempt}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(role)s%(context)s] %(message)s"


def new_request_id() -> str:
    return secrets.token_hex(16)


def sane_request_id(value: str | None) -> str:
    """`value` if it is a sane request id (at most 128 letters, digits and `._:-`), else a fresh one: what a
    client sends ends up in log lines, so nothing else is taken from it."""
    return value if value and SANE_REQUEST_ID.fullmatch(value) else new_request_id()


class ContextFilter(logging.Filter):
    """Stamps each record with the process's role and the context variables set where it was logged."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        known = {name: var.get() for name, var in CONTEXT.items()}
        context = {name: value for name, value in known.items() if value is not None}
        record.phitune_context = context
        record.context = "".join(f" {name}={value}" for name, value in context.items())
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": getattr(record, "role", None),
            **getattr(record, "phitune_context", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def json_line(role: str, logger: str, level: int, message: str) -> str:
    """One JSON log line made without the logging machinery (whose locks a signal handler must not take)."""
    record = logging.LogRecord(logger, level, __file__, 0, message, None, None)
    ContextFilter(role).filter(record)
    return JsonFormatter().format(record)


def configure(role: str, log_format: str = "text", level: str = "INFO") -> None:
    """Route every record of this process to one stderr handler in `log_format`. Loggers that libraries gave
    handlers of their own (uvicorn's, transformers', datasets') are made to propagate to it instead: call this
    first thing (what libraries log at import is formatted too), and again once they are imported."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter(role))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers = []
            logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn goes through the handler, not straight to stderr
    if log_format == "json":
        _no_progress_bars()


# Progress bars (model loading, dataset mapping) draw on stderr around the handler: not in a JSON log.
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def _no_progress_bars() -> None:
    """Off in the libraries imported from now on (their switches are read at import), and in those loaded."""
    for switch in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(switch, "1")
    if (hub := sys.modules.get("huggingface_hub.utils")) is not None:
        hub.disable_progress_bars()
    if (transformers := sys.modules.get("transformers.utils.logging")) is not None:
        transformers.disable_progress_bar()
    if (datasets := sys.modules.get("datasets.utils.tqdm")) is not None:
        datasets.disable_progress_bars()
