"""The worker's shutdown request. SIGTERM (a spot reclaim, a redeploy, `docker stop`) sets it; the running
attempt then saves its state at the next step boundary, hands the job back as queued and returns, after
which Celery's warm shutdown lets the process exit."""

from __future__ import annotations

import threading

requested = threading.Event()
