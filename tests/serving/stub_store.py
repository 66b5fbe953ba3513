"""A stand-in for the API's internal adapter route, served over real HTTP, for inference server tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import FileResponse

from app.adapter_format import FORMAT_HEADER
from phitune.launch import free_port


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port from a background thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def adapter_store_app(
    archives: dict[str, Path], serving_token: str, formats: dict[str, str] | None = None
) -> FastAPI:
    """GET /internal/v1/adapters/{id} answers the archive, as the API does for the inference server, with
    its format (`formats`, "peft" by default) in the X-Phitune-Adapter-Format header."""
    app = FastAPI()
    formats = formats or {}

    @app.get("/internal/v1/adapters/{adapter_id}")
    def adapter(adapter_id: str, authorization: str = Header("")) -> FileResponse:
        if authorization != f"Bearer {serving_token}":
            raise HTTPException(401)
        if adapter_id not in archives:
            raise HTTPException(404)
        return FileResponse(
            archives[adapter_id],
            media_type="application/gzip",
            headers={FORMAT_HEADER: formats.get(adapter_id, "peft")},
        )

    return app
