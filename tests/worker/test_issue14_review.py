"""Issue 14 review: rank 0's connection to the worker cannot be taken by another process."""

from __future__ import annotations

import stat
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from worker import distributed


class Reporter:
    def message(self, text: str, **_: object) -> str:
        return f"seen {text}"


def test_a_process_without_the_key_cannot_keep_rank_0_from_the_worker() -> None:
    served = distributed._Served(Reporter())  # type: ignore[arg-type]
    with distributed.listen() as (listener, reach):
        socket_dir = Path(reach[distributed.ADDRESS_ENV]).parent
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700  # no other user can connect at all
        threading.Thread(target=served.serve, args=(listener,), daemon=True).start()
        with pytest.raises(AuthenticationError):  # a local process that knocks first, without the key
            Client(reach[distributed.ADDRESS_ENV], family="AF_UNIX", authkey=b"not the key")
        with distributed.connect(reach) as rank_0:
            rank_0.send(distributed.RankCall("message", ("step 1",)))
            assert rank_0.poll(10), "the worker no longer answers rank 0"
            assert rank_0.recv() == ("ok", "seen step 1")
    assert not socket_dir.exists()  # the private directory goes with the listener
