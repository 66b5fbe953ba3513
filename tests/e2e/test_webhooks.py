"""Webhook deliveries are rows: one pending when the API process stops is sent by the next API process,
with the same webhook-id, signed with the endpoint's secret."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.e2e.conftest import api_alone
from tests.utils import CHAT_LINES, upload_file
from tests.webhook_receiver import receiving, signature_is_valid, wait_until


def test_a_pending_delivery_survives_an_api_restart(tmp_path: Path) -> None:
    with receiving(503) as receiver:
        running = api_alone(
            tmp_path,
            webhook_allow_private_urls="true",
            webhook_poll_seconds="0.2",
            webhook_retry_seconds="[2, 2, 2, 2, 2, 2]",
        )
        service = next(running)
        try:
            with service.client as client:
                hook = client.post(
                    "/v1/webhooks", json={"url": receiver.url, "events": ["fine_tuning.job.cancelled"]}
                ).json()
                file_id = upload_file(client, {}, CHAT_LINES)  # type: ignore[arg-type]
                job = client.post(
                    "/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id}
                )
                client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
            wait_until(lambda: receiver.received, "a first attempt")
            api = service.processes.pop()
            api.send_signal(signal.SIGTERM)
            api.wait(timeout=30)
            failed_before = len(receiver.received)
            receiver.statuses = [200]

            service.start("api-2", "api", "--port", service.base_url.rsplit(":", 1)[1])
            service.wait_ready()
            with service.client as client:
                (delivery,) = wait_until(
                    lambda: [
                        found
                        for found in client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
                        if found["status"] == "delivered"
                    ],
                    "the delivery after the restart",
                )
        finally:
            next(running, None)  # stops the processes
    assert {r.headers["webhook-id"] for r in receiver.received} == {delivery["id"]}
    assert all(signature_is_valid(hook["secret"], r) for r in receiver.received)
    assert json.loads(receiver.received[-1].body)["data"]["status"] == "cancelled"
    assert len(receiver.received) > failed_before and delivery["attempts"] == len(receiver.received)
