"""The uvicorn server of `phitune api`: on SIGTERM / SIGINT it also asks the app to end its live streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import FrameType

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn stops accepting and waits (up to its timeout_graceful_shutdown) for the requests in flight; a
    live event stream would hold it to the end of that grace and then be cut. So on the signal, `drain` (the
    app's `state.drain`) is called on the event loop, and the streams end with a final event of their own."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        try:
            loop = asyncio.get_running_loop()  # a signal handler runs on the main thread, the loop's
        except RuntimeError:  # the loop is not running yet: no stream is open
            return
        loop.call_soon_threadsafe(self.drain)
